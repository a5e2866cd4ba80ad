"""The TunedModel's examples: JSONL records turned into token ids by the spec's templates.

`check_template` refuses a template that cannot work (broken braces, positional, attribute or
index placeholders, format specs, conversions) before any file is read; `read` reads the records
of a JSONL file or a directory of them (file://, pvc://, s3://, or a ConfigMap key mounted into
the pod) and fails on the first broken one, naming the file, the line and the missing field;
`read_pile` reads a pile version's documents as records (a bounded scan of its documents table at
the pinned snapshot); `split` holds out a stable share for validation; `encode` tokenizes them for
the task (causal-lm: prompt then completion, loss on the completion only; in chat format the
base model's chat template, loss on the assistant's turn only; classification: the prompt and
its label's index). All of it runs on the driver before a worker starts: tuning sets
are written by people and small, and every mistake in them must show before training does.
Called by `fmforge.stages.tune`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...api.v1alpha1.tunedmodel import template_fields
from ..base import InputError, InvalidSpec
from ..piles import PROP_DIGEST
from ..uris import locate

#: A tuning set larger than this is a pile's job, not a JSONL file's.
MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Record:
    """One example as read: its fields, and where it came from (for the error messages)."""

    fields: dict[str, Any]
    where: str
    """`FILE line N`."""
    key: str
    """sha256 of the record's canonical JSON: what the validation split is drawn by."""


def check_template(template: str, field: str) -> list[str]:
    """The record fields `template` reads; InvalidSpec naming `field` and the offending
    placeholder for a template that is more than text, `{{`/`}}` and plain `{field}` placeholders.

    The spec's model refuses such a template already (`fmforge validate`, the CRD's rule); this
    check stands for specs that reach the stage another way, so nothing but a plain field name
    ever reaches `str.format_map` (a format spec such as `{q:99999999}` would reach Python's
    formatter with the record's values: a ValueError mid-run, or a width that exhausts memory)."""
    try:
        return template_fields(template)
    except ValueError as e:
        raise InvalidSpec(f"{field}: {e}") from None


def read(uri: str, base_dir, confine: bool) -> tuple[list[Record], str]:
    """Every record under `uri` (a .jsonl file, or a directory read file by file in name order)
    and the data digest (sha256 over each file's relative name and bytes)."""
    fs, root = locate(uri, base_dir, confine=confine)
    return read_files(fs, root, uri, "spec.data.uri")


def read_config_map(mounted: Path, name: str, key: str) -> tuple[list[Record], str]:
    """The records of a ConfigMap key, read from where the RayJob's pods mount the ConfigMap
    (`mounted`, its directory: one file per key)."""
    import pyarrow.fs as pafs

    path = mounted / key
    if not path.is_file():
        keys = sorted(p.name for p in mounted.iterdir() if not p.name.startswith(".")) if mounted.is_dir() else []
        raise InputError(f"spec.data.configMap: ConfigMap {name} has no key {key!r} (its keys: "
                         f"{', '.join(keys) or 'none'}); put the examples under that key or fix configMap.key")
    return read_files(pafs.LocalFileSystem(), str(path), f"configmap://{name}/{key}", "spec.data.configMap")


def read_files(fs, root: str, uri: str, field: str) -> tuple[list[Record], str]:
    """The records of the JSONL file or directory `root` on `fs`; `uri` names it in the messages."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{field}: {uri}: no such file or directory ({root}); fix the uri")
    if info.type == pafs.FileType.Directory:
        files = sorted((f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                        if f.type == pafs.FileType.File and f.path.endswith(".jsonl")), key=lambda f: f.path)
        if not files:
            raise InputError(f"{field}: {uri} holds no .jsonl file; put the examples in FILE.jsonl there")
    else:
        files = [info]
    total = sum(f.size or 0 for f in files)
    if total > MAX_BYTES:
        raise InputError(f"{field}: {uri} holds {total / 2**20:.0f} MiB of examples, more than the "
                         f"{MAX_BYTES // 2**20} MiB a tuning set may have; publish larger data as a DataPile")
    h = hashlib.sha256()
    records: list[Record] = []
    for f in files:
        name = f.path[len(root):].lstrip("/") or f.base_name
        with fs.open_input_stream(f.path) as s:
            body = s.read()
        h.update(name.encode() + b"\0" + body + b"\0")
        label = uri if len(files) == 1 else f"{uri.rstrip('/')}/{name}"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{label}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{label} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                                 f"be one JSON object") from None
            if not isinstance(row, dict):
                raise InputError(f"{label} line {n}: a {type(row).__name__}, not a JSON object; each line must be "
                                 f"one object of fields")
            key = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()
            records.append(Record(row, f"{label} line {n}", key))
    if not records:
        raise InputError(f"{field}: {uri} holds no examples; write one JSON object per line")
    return records, "sha256:" + h.hexdigest()


def read_pile(ctx, ref, fields: list[str]) -> tuple[list[Record], dict[str, Any]]:
    """The documents of the pile version `ref` (a TuningPileRef) names, as records of the columns
    the templates read (`fields`), and the version's lineage ({name, snapshotId, tag, digest}).

    A scan of the documents table at the pinned snapshot, reading those columns only and at most
    `ref.maxDocuments` rows, so a large pile is never loaded whole. A document whose column is
    null (`prog_lang` of prose, `lang` of code) lacks that field, as a JSONL record would."""
    from .. import piles

    where = "spec.data.dataPileRef"
    _, docs, snap = piles.snapshot_of(ctx, ref, where)
    columns = [f.name for f in docs.schema().fields]
    unknown = [f for f in fields if f not in columns]
    if unknown:
        raise InvalidSpec(f"spec.data: the templates read {', '.join(unknown)}, which the documents of DataPile "
                          f"{ref.name} do not have; its columns are {', '.join(columns)}")
    selected = tuple(dict.fromkeys(["id", *fields]))
    table = docs.scan(snapshot_id=snap.snapshot_id, selected_fields=selected, limit=ref.max_documents).to_arrow()
    if table.nbytes > MAX_BYTES:
        raise InputError(f"{where}: {ref.max_documents} documents of DataPile {ref.name} are "
                         f"{table.nbytes / 2**20:.0f} MiB, more than the {MAX_BYTES // 2**20} MiB a tuning set may "
                         f"have; lower maxDocuments")
    records = []
    for row in table.to_pylist():
        doc = row["id"]
        fields_of = {k: v for k, v in row.items() if v is not None and (k != "id" or "id" in fields)}
        # The document id is unique in a version: the split is drawn by it, stable across runs.
        records.append(Record(fields_of, f"DataPile {ref.name} version {snap.snapshot_id} document {doc}",
                              hashlib.sha256(doc.encode()).hexdigest()))
    if not records:
        raise InputError(f"{where}: DataPile {ref.name} version {snap.snapshot_id} has no documents")
    props = snap.summary.additional_properties if snap.summary else {}
    lineage = {"name": ref.name, "snapshotId": str(snap.snapshot_id), "tag": ref.tag,
               "digest": props.get(PROP_DIGEST)}
    return records, {k: v for k, v in lineage.items() if v is not None}


def fill(template: str, record: Record, field: str) -> str:
    """`template` filled from the record; InputError naming the file, line and field it lacks."""
    try:
        return template.format_map(record.fields)
    except KeyError as e:
        raise InputError(f"{record.where}: no field {e.args[0]!r}, which {field} uses (the record has "
                         f"{', '.join(sorted(record.fields)) or 'no fields'}); add it or change the template") from None


def split(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, validation): the validation share is the records whose content hashes lowest, so
    the split does not depend on the order of the lines and stays put when records are added
    (mostly: a new record may take the place of one). At least one record is held out whenever
    `fraction` is above zero, and at least one is left to train on."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held = {id(r) for r in sorted(records, key=lambda r: r.key)[:n_val]}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


def labels_of(records: list[Record], label_field: str) -> list[str]:
    """The class labels (as strings, sorted) of a classification set; InputError for a record
    without one, or a set with fewer than two."""
    seen = set()
    for r in records:
        v = r.fields.get(label_field)
        if v is None or isinstance(v, (dict, list)):
            raise InputError(f"{r.where}: no label in field {label_field!r} (spec.data.labelField); give every "
                             f"record a string or number label")
        seen.add(str(v))
    if len(seen) < 2:
        raise InputError(f"spec.data: every record has the label {next(iter(seen))!r}; a classifier needs at least "
                         f"two labels in {label_field!r}")
    return sorted(seen)


def encode_causal(records: list[Record], tok, prompt_t: str, completion_t: str, context: int) -> list[dict]:
    """Token ids of prompt + completion + end-of-text, and labels that score the completion
    only (-100 under the prompt)."""
    out = []
    for r in records:
        prompt = tok(fill(prompt_t, r, "spec.data.promptTemplate"))["input_ids"]
        completion = tok(fill(completion_t, r, "spec.data.completionTemplate"), add_special_tokens=False)["input_ids"]
        if not completion:
            raise InputError(f"{r.where}: the completion is empty; a causal-lm example needs text to learn")
        # End-of-text after the completion teaches the model to stop where the answer does.
        out.append(_scored(r, prompt, completion + [tok.eos_token_id], context))
    return out


def _scored(r: Record, prompt: list[int], completion: list[int], context: int, how: str = "") -> dict:
    """One example's ids and labels that score the completion only; an error where it cannot fit."""
    ids = prompt + completion
    if len(ids) > context:
        raise InputError(f"{r.where}: the example is {len(ids)} tokens{how}; the base model reads at most {context}; "
                         f"shorten it or leave it out")
    return {"input_ids": ids, "labels": [-100] * len(prompt) + completion}


def encode_chat(records: list[Record], tok, prompt_t: str, completion_t: str, context: int) -> list[dict]:
    """Token ids of each example in the base model's chat template (the filled prompt template as
    the user's turn, the completion as the assistant's, both stripped of surrounding whitespace:
    the template separates the turns), and labels that score the assistant's turn only, its end
    of turn included (-100 under the system and user turns and the assistant's header)."""
    from ..models import chat_example_ids

    out = []
    for r in records:
        user = fill(prompt_t, r, "spec.data.promptTemplate").strip()
        answer = fill(completion_t, r, "spec.data.completionTemplate").strip()
        if not answer:
            raise InputError(f"{r.where}: the completion is empty; a chat example needs an answer to learn")
        try:
            prompt, completion = chat_example_ids(tok, user, answer)
        except ValueError as e:
            raise InputError(f"{r.where}: {e}; use format text for this model") from None
        out.append(_scored(r, prompt, completion, context, " in the chat template"))
    return out


def encode_classification(records: list[Record], tok, prompt_t: str, label_field: str, labels: list[str],
                          context: int) -> list[dict]:
    """Token ids of each prompt (truncated to the model's context) and its label's index."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for r in records:
        text = fill(prompt_t, r, "spec.data.promptTemplate")
        label = r.fields.get(label_field)
        if label is None or str(label) not in index:
            raise InputError(f"{r.where}: the label {label!r} in field {label_field!r} is not one of the training "
                             f"labels {labels}")
        ids = tok(text, truncation=True, max_length=context)["input_ids"]
        out.append({"input_ids": ids, "label": index[str(label)]})
    return out
