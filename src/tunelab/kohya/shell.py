"""A kohya launch as users write it, read without running a shell.

The input is a shell script (bash, Windows cmd or PowerShell) or the words of one command line.
What is understood:

* **continuations**: a line ending in `\\` (bash), `^` (cmd) or a backtick (PowerShell) goes on
  in the next line;
* **comments**: `# ...` (bash, PowerShell), `REM ...` / `:: ...` (cmd). A commented-out flag in
  the middle of a continued command is skipped and the command goes on, as its author meant (bash
  itself would end the command at that line: the note says so);
* **variables**: `NAME=value`, `export NAME=value`, `set NAME=value` (cmd), `$env:NAME = "value"`
  and `$NAME = "value"` (PowerShell) lines define them; `$NAME`, `${NAME}`, `%NAME%` and `$env:NAME`
  expand from those, then from the environment (unknown ones stay as written, with a note);
* **quoting**: bash's single quotes (literal), double quotes (`\\"`, `\\\\`, `\\$` escapes) and
  backslash escapes outside quotes; cmd and PowerShell keep backslashes (Windows paths) and take
  double (and, in PowerShell, single) quotes;
* **the command**: the first line that runs a `*train*.py` script; what precedes the script is the
  launcher (`accelerate launch` with its options, `python`, `python -m accelerate.commands.launch`).

`--flag=value`, `--flag value [value ...]` and bare `--flag` follow the script. A line that cannot
be read (an unterminated quote, a word where a flag must be) is a one-line error naming the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

_ASSIGN = {
    "bash": re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$"),
    "cmd": re.compile(r"^set\s+\"?([A-Za-z_][A-Za-z0-9_]*)=(.*?)\"?$", re.IGNORECASE),
    "powershell": re.compile(r"^\$(?:env:)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", re.IGNORECASE),
}
_CONTINUATION = {"bash": "\\", "cmd": "^", "powershell": "`"}
_VAR = {
    "bash": re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)"),
    "cmd": re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%"),
    "powershell": re.compile(r"\$env:([A-Za-z_][A-Za-z0-9_]*)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                             re.IGNORECASE),
}


@dataclass
class Flag:
    name: str  # without the leading dashes, e.g. "learning_rate"
    values: list[str]  # [] for a bare switch
    line: int  # where it was written (1-based; 0 for words given on the command line)


@dataclass
class Launch:
    """One kohya command: the launcher's options, the script, its flags, and what was noticed."""

    script: str
    launcher: list[Flag] = field(default_factory=list)  # accelerate launch options
    flags: list[Flag] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = "command line"


def dialect_of(text: str, name: str = "") -> str:
    """bash, cmd or powershell: by the file's extension, else by its continuation characters."""
    ext = Path(name).suffix.lower()
    if ext in (".bat", ".cmd"):
        return "cmd"
    if ext == ".ps1":
        return "powershell"
    ends = [line.rstrip()[-1:] for line in text.splitlines() if line.strip()]
    if ends.count("^") > ends.count("\\") and ends.count("^") >= ends.count("`"):
        return "cmd"
    if ends.count("`") > ends.count("\\"):
        return "powershell"
    return "bash"


def _is_comment(line: str, dialect: str) -> bool:
    s = line.lstrip()
    if dialect == "cmd":
        return s.upper().startswith("REM ") or s.upper() == "REM" or s.startswith("::")
    return s.startswith("#")


def logical_lines(text: str, dialect: str) -> list[tuple[int, str, list[int]]]:
    """(first line number, joined text, commented-out line numbers skipped inside it)."""
    cont = _CONTINUATION[dialect]
    out: list[tuple[int, str, list[int]]] = []
    buf: list[str] = []
    start, skipped = 0, []
    for no, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = raw.rstrip()
        if buf and _is_comment(line, dialect):  # a flag commented out inside a continued command
            skipped.append(no)
            if not line.endswith(cont):  # the comment was the last line: the command ends here
                out.append((start, " ".join(buf), skipped))
                buf, skipped = [], []
            continue
        if not buf:
            if not line.strip() or _is_comment(line, dialect):
                continue
            start = no
        if line.endswith(cont) and not line.endswith(cont * 2):
            buf.append(line[:-1])
            continue
        buf.append(line)
        out.append((start, " ".join(buf), skipped))
        buf, skipped = [], []
    if buf:
        out.append((start, " ".join(buf), skipped))
    return out


def split_words(line: str, dialect: str, where: str) -> list[str]:
    """The words of one command line, quotes removed, as the shell would hand them over."""
    words: list[str] = []
    cur: list[str] = []
    has = False
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            if has:
                words.append("".join(cur))
                cur, has = [], False
            i += 1
            continue
        if c == "#" and not has and dialect != "cmd":
            break  # a comment to the end of the line
        if c == "'" and dialect in ("bash", "powershell"):
            end = line.find("'", i + 1)
            if end < 0:
                raise TunelabError(f"{where}: unterminated ' quote in: {line.strip()}")
            cur.append(line[i + 1:end])
            has, i = True, end + 1
            continue
        if c == '"':
            j = i + 1
            while j < n and line[j] != '"':
                if dialect == "bash" and line[j] == "\\" and j + 1 < n and line[j + 1] in '"\\$`':
                    cur.append(line[j + 1])
                    j += 2
                    continue
                cur.append(line[j])
                j += 1
            if j >= n:
                raise TunelabError(f"{where}: unterminated \" quote in: {line.strip()}")
            has, i = True, j + 1
            continue
        if c == "\\" and dialect == "bash" and i + 1 < n:
            cur.append(line[i + 1])
            has, i = True, i + 2
            continue
        cur.append(c)
        has, i = True, i + 1
    if has:
        words.append("".join(cur))
    return words


def expand(text: str, env: dict[str, str], dialect: str, unknown: set[str]) -> str:
    """Variables replaced from `env`, then os.environ (bash: not inside single quotes)."""
    pattern = _VAR[dialect]

    def sub(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name in env:
            return env[name]
        if name in os.environ:
            return os.environ[name]
        unknown.add(name)
        return m.group(0)

    if dialect != "bash":
        return pattern.sub(sub, text)
    parts = re.split(r"('[^']*')", text)  # single-quoted spans stay literal
    return "".join(p if p.startswith("'") and p.endswith("'") and len(p) > 1 else pattern.sub(sub, p) for p in parts)


def _is_trainer(word: str) -> bool:
    base = word.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return base.endswith(".py") and "train" in base


def _flags(words: list[str], line: int, where: str, what: str) -> list[Flag]:
    flags: list[Flag] = []
    for w in words:
        if w.startswith("--") and len(w) > 2:
            name, eq, value = w[2:].partition("=")
            flags.append(Flag(name.replace("-", "_"), [value] if eq else [], line))
        elif flags:
            flags[-1].values.append(w)
        else:
            raise TunelabError(f"{where}: {w!r} before any flag of {what}; kohya's options start with --")
    return flags


def parse_words(words: list[str], line: int = 0, where: str = "command line", notes: list[str] | None = None) -> Launch:
    """A command already split into words (what the user's shell passed to `from-kohya`)."""
    at = next((i for i, w in enumerate(words) if _is_trainer(w)), None)
    if at is None:
        if words and words[0].startswith("--"):  # only the flags: sdxl_train.py's
            return Launch("sdxl_train.py", [], _flags(words, line, where, "sdxl_train.py"), notes or [], where)
        raise TunelabError(f"{where}: no training script in it (expected `accelerate launch ... sdxl_train.py --flag ...`)")
    launcher = _launcher(words[:at], line, where)
    flags = _flags(words[at + 1:], line, where, words[at])
    return Launch(words[at], launcher, flags, notes or [], where)


def _launcher(words: list[str], line: int, where: str) -> list[Flag]:
    """accelerate launch's options (the words between `launch` and the script)."""
    at = next((i for i, w in enumerate(words) if w == "launch" or w.endswith(".launch")), None)
    if at is None:
        return []  # `python sdxl_train.py ...`: no launcher options
    return _flags(words[at + 1:], line, where, "accelerate launch")


def parse_script(text: str, name: str = "script") -> Launch:
    """The kohya command in a shell script (the first line that runs a training script)."""
    dialect = dialect_of(text, name)
    env: dict[str, str] = {}
    unknown: set[str] = set()
    notes: list[str] = []
    assign = _ASSIGN[dialect]
    for start, line, skipped in logical_lines(text, dialect):
        m = assign.match(line.strip())
        if m and not _is_trainer(line):
            value = split_words(m[2], dialect, f"{name}:{start}")
            env[m[1]] = expand(" ".join(value), env, dialect, unknown) if value else ""
            continue
        words = split_words(expand(line, env, dialect, unknown), dialect, f"{name}:{start}")
        if not any(_is_trainer(w) for w in words):
            continue  # cd, source venv/bin/activate, echo ...
        if skipped:
            lines = ", ".join(map(str, skipped))
            notes.append(f"line(s) {lines}: commented out inside the command, skipped"
                         + ("; bash itself would end the command at the first of them, so check that the "
                            "script does what you meant" if dialect == "bash" else ""))
        if unknown:
            notes.append("variable(s) not defined in the script or the environment, left as written: "
                         + ", ".join(sorted(unknown)))
        launch = parse_words(words, start, f"{name}:{start}", notes)
        launch.source = name
        return launch
    raise TunelabError(f"{name}: no line runs a kohya training script (sdxl_train.py)")
