"""A real Kubernetes control plane for the tests, started the way controller-runtime's envtest does.

etcd, kube-apiserver and kube-controller-manager (for garbage collection of owner references and
namespace deletion) built from the Go module proxy by `build-controlplane.sh` and cached outside
the checkout; a generated PKI (CA, serving cert for 127.0.0.1/localhost, a `system:masters`
client cert, a service-account key pair); free loopback ports; a kubeconfig for the Python
client, kopf and kubectl; readiness waited on `/readyz`; logs kept for failing tests. Stopping
ends only the processes it started and removes its directory.

Used by the session fixture in tests/cluster/conftest.py, and interactively:

    python tests/cluster/controlplane.py     # start, print the KUBECONFIG line, stop on Ctrl-C
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = HERE / "build-controlplane.sh"
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
KUBERAY_VERSION = os.environ.get("KUBERAY_VERSION", "v1.5.0")
KSERVE_MODULE = "github.com/kserve/kserve"
# The module proxy lists no KServe versions, but serves these exact ones: newest first.
KSERVE_VERSIONS = os.environ.get("KSERVE_VERSIONS", "v0.17.0 v0.16.0").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(what: str) -> Path:
    """The cache directory holding the binaries of `what`, building them on first use."""
    r = subprocess.run([str(BUILD), what], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{BUILD.name} {what} failed:\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


# -- PKI ------------------------------------------------------------------------------------------


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject, issuer, pub, signing_key, *, ca: bool, sans=(), usages=()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=not ca, key_cert_sign=ca, crl_sign=ca,
                          content_commitment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return b.sign(signing_key, hashes.SHA256())


@dataclass
class Pki:
    """Files of the generated PKI, in one directory."""

    dir: Path

    def generate(self, address: str = "127.0.0.1") -> Pki:
        """The CA, the API server's serving certificate (for 127.0.0.1, `address` and the
        `kubernetes` Service's names), the admin's client certificate and the service-account keys."""
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("fmforge-test-ca")
        ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv = _cert(
            _name("kube-apiserver"), ca_name, srv_key.public_key(), ca_key, ca=False,
            sans=[x509.DNSName("localhost"), x509.DNSName("kubernetes.default.svc"),
                  x509.DNSName("kubernetes.default.svc.cluster.local"), x509.DNSName("kubernetes.default"),
                  x509.DNSName("kubernetes"),
                  *[x509.IPAddress(ipaddress.ip_address(a))
                    for a in dict.fromkeys(("127.0.0.1", "10.0.0.1", address))]],
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        adm_key = ec.generate_private_key(ec.SECP256R1())
        adm = _cert(_name("fmforge-test-admin", "system:masters"), ca_name, adm_key.public_key(), ca_key,
                    ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
        files = {
            "ca.crt": pem(ca), "ca.key": _pem_key(ca_key),
            "apiserver.crt": pem(srv), "apiserver.key": _pem_key(srv_key),
            "admin.crt": pem(adm), "admin.key": _pem_key(adm_key),
            "sa.key": _pem_key(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo),
        }
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
            os.chmod(self.dir / name, 0o600)
        return self

    def client(self, name: str, cn: str, org: str | None = None) -> tuple[str, str]:
        """A client certificate signed by the CA (user `cn`, group `org`): NAME.crt and NAME.key."""
        ca_key = serialization.load_pem_private_key(Path(self["ca.key"]).read_bytes(), None)
        ca = x509.load_pem_x509_certificate(Path(self["ca.crt"]).read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name(cn, org), ca.subject, key.public_key(), ca_key, ca=False,
                     usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        (self.dir / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / f"{name}.key").write_bytes(_pem_key(key))
        os.chmod(self.dir / f"{name}.key", 0o600)
        return self[f"{name}.crt"], self[f"{name}.key"]

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


# -- the control plane ----------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, in a directory of their own.

    `address`: where kube-apiserver listens and what it advertises (the `kubernetes` Service's
    endpoint); the node tier (tests/node) gives its bridge's address, which pods reach.
    `node`: what a real node needs too: the Node authorizer and NodeRestriction for kubelets,
    kube-apiserver's client certificate for kubelets (logs, exec), and every default controller
    of kube-controller-manager (deployments, endpoints, jobs, volumes, the root CA ConfigMap...)."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fmforge-cp-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    port: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    address: str = "127.0.0.1"
    node: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def kubectl_path(self) -> Path:
        return self.k8s / "kubectl"

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, timeout: float = 120.0) -> ControlPlane:
        t0 = time.monotonic()
        self.etcd_dir = build("etcd")
        self.k8s = build("k8s")
        self.timings["build"] = time.monotonic() - t0
        t1 = time.monotonic()
        pki = self.pki = Pki(self.workdir / "pki").generate(self.address)
        etcd_port, etcd_peer = free_port(), free_port()
        self._spawn("etcd", [
            str(self.etcd_dir / "etcd"), "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(2 << 30), "--log-level", "warn",
        ])
        self.port = free_port()
        self._spawn("kube-apiserver", [
            str(self.k8s / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={self.port}", f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki['apiserver.crt']}", f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24",
            *(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
               f"--kubelet-client-certificate={pki['admin.crt']}", f"--kubelet-client-key={pki['admin.key']}",
               "--kubelet-preferred-address-types=InternalIP"]
              if self.node else ["--authorization-mode=RBAC"]),
            # Privileged pods are allowed by the server, so that Pod Security admission, not this
            # flag, is what rejects them in a `restricted` namespace.
            "--allow-privileged=true",
            "--v=1",
        ])
        self._write_kubeconfig(pki)
        self._wait_ready(pki, timeout)
        kcm_port = free_port()
        self._spawn("kube-controller-manager", [
            str(self.k8s / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            f"--secure-port={kcm_port}", "--bind-address=127.0.0.1",
            "--leader-elect=false", "--authentication-skip-lookup=true",
            f"--service-account-private-key-file={pki['sa.key']}", f"--root-ca-file={pki['ca.crt']}",
            "--use-service-account-credentials=false",
            # The controllers the tests rely on (resourcequota: a quota on RayJobs holds the
            # operator at a known point in a fault test), and nothing that needs nodes or a cloud; with a
            # node, every default one.
            "--controllers=" + ("*" if self.node else
                                "garbagecollector,namespace,resourcequota,serviceaccount,serviceaccount-token"),
            "--concurrent-gc-syncs=5",
            "--v=1",
        ])
        self.timings["start"] = time.monotonic() - t1
        return self

    def restart_apiserver(self, down: float = 2.0, timeout: float = 120.0) -> None:
        """Kill kube-apiserver (SIGKILL: a crash, and no minute of graceful watch draining), leave it
        down `down` seconds, start it again on the same port."""
        p = self.procs["kube-apiserver"]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        time.sleep(down)
        self._spawn("kube-apiserver", self.args["kube-apiserver"])
        self._wait_ready(self.pki, timeout)

    def _spawn(self, name: str, args: list[str]) -> None:
        self.args[name] = args
        out = self.log(name).open("ab")
        # A process group of its own, so stop() ends exactly what was started here.
        self.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, cwd=self.workdir)

    def _write_kubeconfig(self, pki: Pki) -> None:
        import base64

        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fmforge-test",
            "clusters": [{"name": "fmforge-test", "cluster": {"server": self.url,
                                                              "certificate-authority-data": b64(pki["ca.crt"])}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": b64(pki["admin.crt"]),
                                                 "client-key-data": b64(pki["admin.key"])}}],
            "contexts": [{"name": "fmforge-test", "context": {"cluster": "fmforge-test", "user": "admin",
                                                              "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))

    def _wait_ready(self, pki: Pki, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=pki["ca.crt"])
        ctx.load_cert_chain(pki["admin.crt"], pki["admin.key"])
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet: connection refused, 500 while post-start hooks run
                last = str(e)
            time.sleep(0.3)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}):\n{self.tail('kube-apiserver')}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
                           input=input, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.tail(n)}" for n in self.procs)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                # kube-apiserver drains its watches for up to a minute; nothing here needs that.
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- third-party CRDs -----------------------------------------------------------------------------


def module_dir(module: str, version: str) -> Path:
    """Download a Go module with the go command (module proxy, cached) and return its directory."""
    import json

    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    r = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], capture_output=True,
                       text=True, env=env, cwd=tempfile.gettempdir())
    info = json.loads(r.stdout or "{}") if r.stdout.strip().startswith("{") else {}
    if r.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {module}@{version}: {info.get('Error') or r.stderr.strip()}")
    return Path(info["Dir"])


def kuberay_crds() -> list[Path]:
    d = module_dir(KUBERAY_MODULE, KUBERAY_VERSION) / "config" / "crd" / "bases"
    return [d / "ray.io_rayjobs.yaml", d / "ray.io_rayclusters.yaml"]


def kserve_crds() -> tuple[str, list[Path]]:
    errors = []
    for v in KSERVE_VERSIONS:
        try:
            d = module_dir(KSERVE_MODULE, v) / "config" / "crd" / "full"
        except RuntimeError as e:
            errors.append(str(e))
            continue
        names = ["serving.kserve.io_inferenceservices.yaml", "serving.kserve.io_servingruntimes.yaml",
                 "serving.kserve.io_clusterservingruntimes.yaml"]
        return v, [d / n for n in names]
    raise RuntimeError("; ".join(errors))


def main() -> int:
    # SIGTERM (a closed terminal, `timeout`) stops the control plane as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cp = ControlPlane().start()
    print(f"Control plane up at {cp.url} (build {cp.timings['build']:.1f}s, start {cp.timings['start']:.1f}s)")
    print(f"export KUBECONFIG={cp.kubeconfig}")
    print(f"kubectl: {cp.kubectl_path}    logs: {cp.workdir}/*.log    Ctrl-C stops it")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
