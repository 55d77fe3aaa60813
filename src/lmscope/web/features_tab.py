"""The Features tab's requests: ``features`` (the dictionary's features on each token of a text) and ``feature``
(one feature's dashboard). The dictionaries are the ones the server was started with (``--sae DIR``); a
request names one by id, never by path, and a dictionary made for another model or site is refused."""

from __future__ import annotations

from ..errors import LmscopeError
from . import features


def features_job(app, data: dict, kind: str):
    from .server import BadRequest, _int_field, _str_field

    entry = app.model(data)
    if not app.dictionaries:
        raise BadRequest(
            "this server has no dictionary; start it with lmscope serve --sae DIR (a features train --out "
            "folder or a SAELens folder)"
        )
    did = _str_field(data, "dictionary") or next(iter(app.dictionaries))
    if did not in app.dictionaries:
        raise BadRequest(f"unknown dictionary '{did}'; this server has: {', '.join(app.dictionaries)}")
    dictionary = app.dictionaries[did]
    from ..features.pipeline import check_dictionary

    try:
        check_dictionary(entry.lm, dictionary.sae)
    except LmscopeError as e:
        raise BadRequest(f"dictionary {did} does not fit {entry.id}: {e}") from None
    lm = entry.lm
    if kind == "features":
        text = app.text(data, entry)
        top = _int_field(data, "top", 1, 32, 5)
        work = lambda ctx: features.sae_features(ctx, lm, dictionary, text, top)  # noqa: E731
    else:
        unit = _int_field(data, "unit", 0, dictionary.sae.d_sae - 1)
        if unit is None:
            raise BadRequest("'unit' is missing: pick a feature")
        work = lambda ctx: features.sae_feature(ctx, lm, dictionary, unit)  # noqa: E731
    return app.jobs.submit(kind, entry.id, work)
