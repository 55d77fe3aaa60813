"""Counterfactual texts: the same case with only a protected attribute changed (CheckList's INV tests).

A ``Swap`` is one named transform (``builtin:gender``, ``builtin:names``, or a user file). Word lists swap
whole words in one pass (``he`` -> ``she`` and ``she`` -> ``he`` at once), keeping the case of each word;
a possessive ``'s`` stays because only the word before the apostrophe matches. Regex rules apply in order.
``apply`` returns the new text and, for every change, its span in the original and in the new text, so
the audit can measure the attribution that sits on exactly the swapped words.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import LmscopeError

BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    files = resources.files("lmscope.audit").joinpath("swaps")
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


@dataclass
class Change:
    """One replaced span: ``old``/``new`` words and their [start, end) character spans."""

    old: str
    new: str
    old_span: tuple[int, int]
    new_span: tuple[int, int]

    @property
    def pair(self) -> str:
        return f"{self.old.lower()}→{self.new.lower()}"


def _keep_case(word: str, replacement: str) -> str:
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]  # "Deshawn"/"DeShawn": the list's own spelling
    return replacement.lower()


@dataclass
class Swap:
    """A named counterfactual transform: a word map (one pass, whole words) and/or regex rules."""

    name: str
    description: str = ""
    words: dict[str, str] = field(default_factory=dict)  # lowercase word -> replacement
    rules: list[tuple[re.Pattern, str]] = field(default_factory=list)

    def __post_init__(self):
        self._pattern = None
        if self.words:
            alternatives = sorted(self.words, key=len, reverse=True)  # longest first: "hers" before "her"
            self._pattern = re.compile(
                r"(?<![\w'])(" + "|".join(map(re.escape, alternatives)) + r")(?!\w)", re.IGNORECASE
            )

    def apply(self, text: str) -> tuple[str, list[Change]]:
        """(new text, changes); no changes when nothing matched."""
        changes: list[Change] = []
        if self._pattern is not None:
            out, at, shift = [], 0, 0
            for m in self._pattern.finditer(text):
                word = m.group(1)
                new = _keep_case(word, self.words[word.lower()])
                out.append(text[at : m.start()])
                start = m.start() + shift
                changes.append(Change(word, new, (m.start(), m.end()), (start, start + len(new))))
                out.append(new)
                shift += len(new) - len(word)
                at = m.end()
            out.append(text[at:])
            text = "".join(out)
        for pattern, replacement in self.rules:
            # a regex rule runs after the word map: its spans are located in the text it sees; the
            # spans of earlier changes keep their positions only when the rule does not move them
            new_text, out, at, rule_changes, shift = text, [], 0, [], 0
            for m in pattern.finditer(text):
                new = m.expand(replacement)
                out.append(text[at : m.start()])
                start = m.start() + shift
                rule_changes.append(Change(m.group(0), new, (m.start(), m.end()), (start, start + len(new))))
                out.append(new)
                shift += len(new) - len(m.group(0))
                at = m.end()
            if rule_changes:
                out.append(text[at:])
                new_text = "".join(out)
                if changes:  # keep earlier spans honest: re-map their new spans through this rule
                    changes = [_shift_change(c, rule_changes) for c in changes]
                changes += rule_changes
                text = new_text
        return text, changes

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "n_words": len(self.words),
            "n_rules": len(self.rules),
        }


def _shift_change(c: Change, later: list[Change]) -> Change:
    delta = sum(len(r.new) - len(r.old) for r in later if r.old_span[1] <= c.new_span[0])
    return Change(c.old, c.new, c.old_span, (c.new_span[0] + delta, c.new_span[1] + delta))


def _check_template(pattern: re.Pattern, replacement: str) -> None:
    """Fail now (not mid-audit) on a replacement naming a group the pattern lacks."""
    for ref in re.findall(r"\\(\d+)|\\g<(\w+)>", replacement):
        number, name = ref
        key = number or name
        if key.isdigit() and int(key) > pattern.groups:
            raise re.error(f"replacement refers to group {key}, the pattern has {pattern.groups}")
        if not key.isdigit() and key not in pattern.groupindex:
            raise re.error(f"replacement refers to group '{key}', which the pattern does not define")


def _from_dict(data, where: str, default_name: str) -> Swap:
    fix = (
        'write {"pairs": [["he", "she"], ...]} (swapped both ways), a bare list of pairs, or '
        '{"regex": [{"pattern": "...", "replacement": "..."}]}'
    )
    if isinstance(data, list):
        data = {"pairs": data}
    if not isinstance(data, dict):
        raise LmscopeError(f"swap file {where} holds {type(data).__name__}, not pairs or rules", fix)
    unknown = sorted(set(data) - {"name", "description", "pairs", "one_way", "regex"})
    if unknown:
        raise LmscopeError(f"swap file {where} has unknown key(s) {', '.join(unknown)}", fix)
    words: dict[str, str] = {}
    for key, both in (("pairs", True), ("one_way", False)):
        pairs = data.get(key, [])
        if not isinstance(pairs, list):
            raise LmscopeError(f"swap file {where}: '{key}' must be a list of [word, word] pairs", fix)
        for i, p in enumerate(pairs):
            if (
                not isinstance(p, list)
                or len(p) != 2
                or not all(isinstance(w, str) and w.strip() and w == w.strip() for w in p)
            ):
                raise LmscopeError(f"swap file {where}: {key}[{i}] is {p!r}, not a pair of two words", fix)
            a, b = p[0].lower(), p[1].lower()
            if a == b:
                raise LmscopeError(f"swap file {where}: {key}[{i}] swaps '{a}' with itself", fix)
            for src, dst in ((a, p[1]), (b, p[0])) if both else ((a, p[1]),):
                if src in words and words[src].lower() != dst.lower():
                    raise LmscopeError(
                        f"swap file {where}: '{src}' maps to both '{words[src]}' and '{dst}'", fix
                    )
                words[src] = dst
    rules = []
    raw_rules = data.get("regex", [])
    if not isinstance(raw_rules, list):
        raise LmscopeError(f"swap file {where}: 'regex' must be a list of rules", fix)
    for i, r in enumerate(raw_rules):
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str) or "replacement" not in r:
            raise LmscopeError(f"swap file {where}: regex[{i}] needs 'pattern' and 'replacement'", fix)
        try:
            pattern = re.compile(r["pattern"])
            _check_template(pattern, str(r["replacement"]))
        except (re.error, IndexError) as e:
            raise LmscopeError(f"swap file {where}: regex[{i}] is not valid ({e})", fix) from None
        if pattern.search("") is not None:
            raise LmscopeError(f"swap file {where}: regex[{i}] matches the empty string", fix)
        rules.append((pattern, str(r["replacement"])))
    if not words and not rules:
        raise LmscopeError(f"swap file {where} holds no pairs and no rules", fix)
    name = data.get("name", default_name)
    return Swap(str(name), str(data.get("description", "")), words, rules)


def load_swap(spec: str) -> Swap:
    """One swap: ``builtin:NAME`` (a single name) or a JSON file."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in builtin_names():
            raise LmscopeError(
                f"no built-in swap list '{name}'",
                f"use builtin:{','.join(builtin_names())} or a JSON swap file",
            )
        text = resources.files("lmscope.audit").joinpath("swaps").joinpath(f"{name}.json").read_text("utf-8")
        return _from_dict(json.loads(text), f"builtin:{name}", name)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LmscopeError(
            f"swap file '{spec}' does not exist",
            f"pass a JSON swap file or builtin:{','.join(builtin_names())}",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LmscopeError(f"swap file '{spec}' is not UTF-8 text", "save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise LmscopeError(
            f"swap file '{spec}' is not valid JSON (line {e.lineno}: {e.msg})", "fix the JSON"
        ) from None
    return _from_dict(data, f"'{spec}'", path.stem)


def load_swaps(specs) -> list[Swap]:
    """``["builtin:gender,names", "mine.json"]`` -> one Swap per name/file (duplicates refused)."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[Swap] = []
    for spec in specs or []:
        if spec.startswith(BUILTIN_PREFIX):
            names = [n.strip() for n in spec[len(BUILTIN_PREFIX) :].split(",") if n.strip()]
            if not names:
                raise LmscopeError("builtin: names no swap list", f"use builtin:{','.join(builtin_names())}")
            out += [load_swap(BUILTIN_PREFIX + n) for n in names]
        else:
            out.append(load_swap(spec))
    seen = set()
    for s in out:
        if s.name in seen:
            raise LmscopeError(f"the swap list '{s.name}' is given twice", "pass each swap list once")
        seen.add(s.name)
    return out
