"""`status.progress` written from a stage's pod takes the CRD's shape: the figures a stage shows
on the console are text (`loss="4.528"`) and named for people (`tokens_s`); the API server refused
the whole write when they were sent as they were (found on the real node, tests/node)."""

from fmforge.runtime.report import _progress_model, progress_status


def test_console_figures_become_the_schemas_numbers_and_names():
    model = _progress_model("TrainingRun")
    got = progress_status(model, {"step": 278, "maxSteps": 1500, "loss": "4.528", "lr": "2.76e-03",
                                  "tokensS": "2117", "eta": "8m02s"})
    assert got == {"step": 278, "maxSteps": 1500, "loss": 4.528, "tokensPerSecond": 2117.0, "eta": "8m02s"}


def test_a_figure_that_is_no_number_leaves_step_and_max_steps():
    model = _progress_model("TunedModel")
    assert progress_status(model, {"step": 3, "maxSteps": 9, "loss": "nan?"}) == {"step": 3, "maxSteps": 9}


def test_kinds_without_progress_have_no_model():
    assert _progress_model("DataPile") is None and _progress_model("ModelCard") is None
