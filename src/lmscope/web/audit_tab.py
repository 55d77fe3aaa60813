"""The Audit tab's request: an uploaded dataset (and swap file) plus the audit's options, checked with the
audit's own checks before the job is queued, so bad input is one line in the page, never a failed job.

The uploads are claimed by the request: the job removes their temporary folders when it ends, and a request
refused here removes them at once.
"""

from __future__ import annotations

import copy

from ..errors import LmscopeError
from . import features
from .uploads import Upload


def audit_job(app, data: dict):
    from .server import BadRequest

    if not data.get("data"):
        raise BadRequest("no dataset: choose a .jsonl, .csv, .tsv or .parquet file to upload")
    owned: list[Upload] = [app.uploads.claim(data["data"], "dataset")]
    try:
        entry = app.model(data)
        if data.get("swaps"):
            owned.append(app.uploads.claim(data["swaps"], "swap file"))
        try:
            options = audit_options(app, entry, data, owned[0], owned[1] if len(owned) > 1 else None)
        except LmscopeError as e:  # the audit's own message, naming the uploaded file (not its folder)
            message = tab_words(str(e))
            for upload in owned:
                message = upload.local(message)
            raise BadRequest(message) from None
    except BaseException:
        for upload in owned:
            app.uploads.remove(upload)
        raise
    upload, lm = owned[0], entry.lm

    def cleanup() -> None:
        for u in owned:
            app.uploads.remove(u)

    return app.jobs.submit(
        "audit",
        entry.id,
        lambda ctx: features.audit(ctx, lm, upload.path, upload.name, upload.folder, options),
        cleanup=cleanup,
    )


# the audit's checks speak the CLI's language (flags); the tab's user sees boxes and menus
_TAB_WORDS = [
    (r"pass --(text|label|group|id)-field with the right name", r"put the right name in the \1 field box"),
    (r"pass --(text|label|group|id)-field (NAME|naming)[^—]*", r"put the field's name in the \1 field box"),
    (r"drop --(text|label|group|id)-field", r"clear the \1 field box"),
    (r"drop --prompt/--choices", "clear the prompt and choices"),
    (r"--prompt/--choices need", "a prompt and choices need"),
    (
        r'use a causal LM with --prompt "[^"]*" --choices( "[^"]*")+',
        "pick a causal LM and fill in its prompt and choices",
    ),
    (r"\(e\.g\. --model (\S+)\)", r"(e.g. \1 in the model menu)"),
    (r'--choices " approve" " deny"', 'choices " approve| deny"'),
    (r"--prompt (must|needs)", r"the prompt \1"),
    (r"--choices needs", "the choices need"),
    (r"--prompt", "the prompt"),
    (r"--choices", "choices"),
    (r"--max-cases", "max cases"),
    (r"--positive", "positive class"),
    (r",? or pass --truncate", ""),
    (r"--([a-z][a-z-]*)", lambda m: "'" + m.group(1).replace("-", " ") + "'"),
]


def tab_words(message: str) -> str:
    """An audit error in the Audit tab's words: its boxes and menus instead of the CLI's flags."""
    import re

    for pattern, replacement in _TAB_WORDS:
        message = re.sub(pattern, replacement, message)
    return message


def _bool(data: dict, key: str, default: bool) -> bool:
    from .server import BadRequest

    value = data.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false")
    return value


def audit_options(app, entry, data: dict, upload: Upload, swaps: Upload | None) -> dict:
    """``lmscope.audit.audit``'s keyword arguments from the request, after the checks ``lmscope audit`` makes
    (fields present in the first record, prompt holding {text} once, distinct choices, known swap lists,
    a valid swap file, labels the model knows). Raises LmscopeError or BadRequest."""
    from ..audit.counterfactuals import builtin_names, load_swaps
    from ..audit.data import Cases
    from ..audit.decider import make_decider
    from ..audit.engine import GRANULARITIES
    from ..explain.api import resolve_methods
    from .server import BadRequest, _int_field, _str_field

    fields = {key: _str_field(data, f"{key}_field") for key in ("text", "label", "group", "id")}
    fields["text"] = fields["text"] or "text"
    prompt = _str_field(data, "prompt")
    choices = data.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
    ):
        raise BadRequest('\'choices\' must be a list of answers, e.g. [" approve", " deny"]')
    choices = choices or None
    builtin = data.get("builtin") or []
    if not isinstance(builtin, list) or not all(isinstance(b, str) for b in builtin):
        raise BadRequest("'builtin' must be a list of built-in swap list names")
    unknown = [b for b in builtin if b not in builtin_names()]
    if unknown:
        raise BadRequest(f"no built-in swap list '{unknown[0]}'; use some of: {', '.join(builtin_names())}")
    specs = ([f"builtin:{','.join(builtin)}"] if builtin else []) + ([str(swaps.path)] if swaps else [])
    explain = _bool(data, "explain", True)
    sanity = _bool(data, "sanity", True)
    methods = data.get("methods")
    if methods is not None and (
        not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
    ):
        raise BadRequest("'methods' must be a list of method names")
    granularity = _str_field(data, "granularity") or "word"
    if granularity not in GRANULARITIES:
        raise BadRequest(f"'granularity' must be one of: {', '.join(GRANULARITIES)}")
    limit = app.limits.max_audit_cases
    max_cases = _int_field(data, "max_cases", 1, limit)
    bins = _int_field(data, "bins", 1, 100, 10)
    positive = _str_field(data, "positive")

    # the checks lmscope audit makes before it loads a model, in the same order, with the same messages
    cases = Cases(upload.path, fields["text"], fields["label"], fields["group"], fields["id"])
    if specs:
        load_swaps(specs)
    if explain:
        resolve_methods(methods)
    view = copy.copy(
        entry.lm
    )  # the decider's checks tokenize the choices: on the request's own tokenizer copy
    view.tokenizer = entry.tokenizer
    with entry.tokenizer_lock:
        decider = make_decider(view, prompt, choices)
        first = next(cases.cases())  # a missing field or an empty file fails here, not in the job
        if first.label is not None:
            decider.class_index(first.label, first.where)
        if positive is not None:
            decider.class_index(positive, "'positive'")
    count = cases.count()
    if max_cases is None and count is not None and count > limit:
        raise BadRequest(
            f"{upload.name} holds {count} cases, over this server's limit of {limit} per audit; "
            f"set max cases to {limit} or less"
        )
    return {
        "text_field": fields["text"],
        "label_field": fields["label"],
        "group_field": fields["group"],
        "id_field": fields["id"],
        "prompt": prompt,
        "choices": choices,
        "counterfactuals": specs or None,
        "positive": positive,
        "explain": explain,
        "methods": methods,
        "granularity": granularity,
        "sanity": sanity,
        "max_cases": max_cases,
        "bins": bins,
    }
