"""The fmforge API: versioned models (`v1alpha1`), the CRD generator and the manifest loader."""
