"""The rendered model card: Hugging Face model card (README-style Markdown with YAML front
matter), the same content as JSON, and the loss curve as a PNG.

The front matter is written by `huggingface_hub.ModelCardData` (license, datasets, base_model,
model-index with one result per benchmark), so the Hub and its tools read it as they read any
model card. Called by `fmforge.stages.card`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS = {"decoder": ("text-generation", "Text Generation"), "encoder": ("fill-mask", "Fill-Mask")}


def loss_curve(curve: list[dict[str, float]], out: Path, title: str) -> Path | None:
    """The training loss (and learning rate) by step as a PNG; None without a curve."""
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr = ax.twinx()
    lr.plot([p["step"] for p in curve], [p["lr"] for p in curve], color="tab:gray", alpha=0.5, label="learning rate")
    lr.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def front_matter(card: dict[str, Any]) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    task, task_name = TASKS[card["model"]["architecture"]]
    evals = []
    for r in card["results"]:
        ds = r.get("dataset") or {}
        evals.append(EvalResult(
            task_type=task, task_name=task_name, dataset_type=ds.get("type", "prompts"),
            dataset_name=ds.get("name", r["name"]), dataset_split=ds.get("split"), dataset_revision=ds.get("revision"),
            metric_type=r["metric"], metric_value=r["value"], metric_name=r["name"], verified=False))
    data = ModelCardData(
        model_name=card["name"], license=card["text"].get("license") or None,
        datasets=[p["name"] for p in card.get("datasets", [])] or None, base_model=card.get("baseModel"),
        library_name="transformers", pipeline_tag=task, tags=["fmforge"], eval_results=evals or None)
    return data.to_yaml()


def markdown(card: dict[str, Any]) -> str:
    t, tr, m = card["text"], card.get("training") or {}, card["model"]
    lines = ["---", front_matter(card).rstrip(), "---", "", f"# {card['name']}", ""]
    lines += [t.get("description") or "_No description given._", ""]
    lines += [f"- Model: `{m['digest']}` ({m['architecture']}, {m.get('family') or 'unknown family'}, "
              f"{m.get('parameters') or '?'} parameters), from {m['ref']}",
              *([f"- Base model: {card['base']['uri']} (`{card['base']['digest']}`), measured beside it"]
                if card.get("base") else []),
              f"- Evaluated: {card['evaluatedAt']}",
              f"- Approval ({card['approval']['mode']}): " + (
                  f"approved by {card['approval']['by']}" + (f" at {card['approval']['at']}"
                                                             if card["approval"].get("at") else "")
                  if card["approval"]["approved"]
                  else card["approval"].get("waiting") or "not approved: thresholds not met"),
              f"- Owners: {', '.join(t.get('owners') or []) or 'none given'}", ""]
    lines += ["## Intended use", "", t.get("intendedUse") or "_Not stated._", "",
              "## Limitations", "", t.get("limitations") or "_Not stated._", ""]
    lines += ["## Training data", ""]
    for p in card.get("datasets", []):
        link = f" ([data card]({p['dataCard']}))" if p.get("dataCard") else ""
        lines.append(f"- DataPile `{p['name']}` snapshot {p.get('snapshotId')}"
                     + (f" (tag {p['tag']})" if p.get("tag") else "") + f", digest `{p.get('digest')}`{link}")
    if not card.get("datasets"):
        lines.append("_Unknown: the model directory does not say._")
    lines += ["", "## Training procedure", ""]
    if tr:
        hp = tr.get("training") or {}
        lines += ["| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in hp.items()]
        lines += [f"| workers | {(tr.get('resources') or {}).get('workers')} |",
                  f"| parameters | {tr.get('parameters')} |",
                  f"| validation loss | {tr.get('validationLoss')} |"]
        # Models made since training logs hold no times (a model's bytes depend on its inputs
        # only; the times are in the attempt's run.json): the row shows for older models alone.
        lines += [f"| training time (s) | {tr['seconds']} |"] if tr.get("seconds") is not None else []
        lines += [""]
        if card.get("lossCurve"):
            lines += [f"![Training loss]({card['lossCurve']})", ""]
    else:
        lines += ["_The model directory has no fmforge training log._", ""]
    lines += _results(card)
    lines += ["", "## History", ""]
    if card["history"]:
        lines += ["| evaluated | model | results | approved |", "|---|---|---|---|"]
        for h in card["history"]:
            res = ", ".join(f"{r['name']} {r['value']:.4g}" for r in h["results"])
            lines.append(f"| {h['evaluatedAt']} | `{h['modelDigest'][:19]}` | {res} | {h['approved']} |")
    else:
        lines.append("First evaluation.")
    return "\n".join(lines) + "\n"


def _results(card: dict[str, Any]) -> list[str]:
    """The evaluation results table (with the base model's values beside the model's when it was
    measured too) and the answers to a few prompts."""
    base = card.get("base") is not None
    lines = ["## Evaluation results", "",
             "| benchmark | metric | value | " + ("base model | " if base else "") + "threshold | samples | passed |",
             "|---|---|---|" + ("---|" if base else "") + "---|---|---|"]
    for r in card["results"]:
        th = r.get("threshold") or {}
        bounds = " and ".join(x for x in (f">= {th['min']}" if th.get("min") is not None else "",
                                          f"<= {th['max']}" if th.get("max") is not None else "") if x)
        before = (f"{r['baseValue']:.4g} | " if r.get("baseValue") is not None else "— | ") if base else ""
        lines.append(f"| {r['name']} | {r['metric']} | {r['value']:.4g} | {before}{bounds} | {r.get('samples')} | "
                     f"{'yes' if r['passed'] else 'no'} |")
    for r in card["results"]:
        answers = r.get("examples") or []
        if base and r.get("baseExamples"):
            lines += ["", f"`{r['name']}`: the model's answers beside the base model's", "",
                      "| prompt | expected | model | base model |", "|---|---|---|---|"]
            for d, b in zip(answers, r["baseExamples"], strict=False):
                lines.append(f"| {_cell(d['prompt'])} | {_cell(d['expected'])} | {_cell(d['output'])} "
                             f"({d['score']:.2f}) | {_cell(b['output'])} ({b['score']:.2f}) |")
            continue
        for d in answers[:5]:
            lines.append(f"\n`{r['name']}` prompt {json.dumps(d['prompt'])} → {json.dumps(d['output'])} "
                         f"(expected {json.dumps(d['expected'])}, score {d['score']:.2f})")
    return lines


def _cell(text: str) -> str:
    """Text in one Markdown table cell: one line (a newline shown as \\n), pipes escaped."""
    return text.replace("\\", "\\\\").replace("\r", "").replace("\n", "\\n").replace("|", "\\|")


def write(card: dict[str, Any], out: Path) -> Path:
    """card.json and README.md (the model card) into `out`; the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    path = out / "README.md"
    path.write_text(markdown(card))
    return path


def record_approval(out: Path, model_digest: str, by: str, at: str) -> bool:
    """Write a manual approval into the card of one evaluation (card.json and README.md in
    `out`), if that card evaluated `model_digest`; whether it did."""
    path = out / "card.json"
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if card["model"]["digest"] != model_digest:
        return False
    card["approval"] = {**card["approval"], "approved": True, "by": by, "at": at, "waiting": None}
    write(card, out)
    return True
