"""`distill dedupe [FILE|-]`: de-duplicate chunks from a file or stdin; kept chunks out as JSON Lines.

Input: JSON Lines (one chunk object per line), a JSON array (of chunk objects
or strings), a request body's chunks (`{"chunks": [...]}`), or plain text whose
paragraphs (separated by blank lines) become chunks "1", "2", ... Output: the
kept input objects, every field as given, each with the service's
`cluster_id` added, in the service's order. Stage progress bars go to stderr
when it is a terminal; an error is one line on stderr and exit status 1
(2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, NoReturn, TextIO

from tqdm import tqdm

from ._client import DEFAULT_BASE_URL, DistillClient
from ._errors import DistillError
from ._types import ProgressEvent


class InputError(ValueError):
    """Input that holds no chunks this command can send."""


def read_chunks(text: str) -> list[dict[str, Any]]:
    """The chunk objects in `text`, whichever of the accepted forms it is in."""
    body = text.strip()
    if body.startswith("["):
        return _from_array(_json(body, "the input"))
    if body.startswith("{"):
        return _from_json_lines(body)
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
    if not paragraphs:
        raise InputError("the input holds no chunks")
    return [{"id": str(i), "text": p} for i, p in enumerate(paragraphs, start=1)]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise InputError(f"{where} is not valid JSON: {error}") from None


def _from_array(items: Any) -> list[dict[str, Any]]:
    chunks = []
    for i, item in enumerate(items, start=1):
        if isinstance(item, str):
            chunks.append({"id": str(i), "text": item})
        elif isinstance(item, dict):
            chunks.append(item)
        else:
            raise InputError(f"item {i} of the array is neither a chunk object nor a string")
    if not chunks:
        raise InputError("the input holds no chunks")
    return chunks


def _from_json_lines(body: str) -> list[dict[str, Any]]:
    try:
        whole = json.loads(body)  # one object, maybe over many lines: a request body or a lone chunk
    except ValueError:
        pass
    else:
        return _from_array(whole["chunks"]) if isinstance(whole.get("chunks"), list) else [whole]
    lines = [(n, line) for n, line in enumerate(body.splitlines(), start=1) if line.strip()]
    objects = [_json(line, f"line {n}") for n, line in lines]
    for (n, _), item in zip(lines, objects):
        if not isinstance(item, dict):
            raise InputError(f"line {n} is not a JSON object")
    return objects


class StageBars:
    """One tqdm bar per pipeline stage, in the order the stages start."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._bars: dict[str, tqdm[Any]] = {}

    def update(self, event: ProgressEvent) -> None:
        bar = self._bars.get(event.stage)
        if bar is None:
            columns, rows = self._size()
            bar = tqdm(total=100, position=len(self._bars), file=self._stream, ncols=columns, nrows=rows,
                       bar_format=f"{event.stage:<10}", leave=True)
            self._bars[event.stage] = bar
        stats = ", ".join(f"{name}={value}" for name, value in (event.stats or {}).items())
        stats = stats.replace("{", "{{").replace("}", "}}")
        bar.bar_format = f"{event.stage:<10} {{percentage:3.0f}}%|{{bar}}| {stats}"
        bar.n = round(event.progress * 100)
        bar.refresh()

    def _size(self) -> tuple[int, int]:
        """The terminal's columns and rows; 80 x 24 where it reports none (a bare pseudo-terminal says 0)."""
        try:
            size = os.get_terminal_size(self._stream.fileno())
        except (OSError, ValueError):
            return 80, 24
        return size.columns or 80, size.lines or 24

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="distill", description="Command line of the Distill de-duplication service.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    dedupe = commands.add_parser("dedupe", help="de-duplicate chunks; kept chunks out as JSON Lines",
                                 description=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    dedupe.add_argument("file", nargs="?", default="-", help="input file, or - for stdin (default)")
    dedupe.add_argument("--url", default=os.environ.get("DISTILL_URL", DEFAULT_BASE_URL),
                        help="service address (default: $DISTILL_URL or %(default)s)")
    dedupe.add_argument("--threshold", type=float, help="max cosine distance to merge (default: the server's)")
    dedupe.add_argument("--target-k", type=int, help="re-rank with MMR to at most this many chunks")
    dedupe.add_argument("--api-key", default=os.environ.get("DISTILL_API_KEY"),
                        help="API key (default: $DISTILL_API_KEY)")
    return parser.parse_args(argv)


def _read(path: str) -> str:
    raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"the input is not UTF-8 ({error.reason} at byte {error.start})") from None


def dedupe(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The kept input objects, each with its `cluster_id`."""
    chunks = read_chunks(_read(args.file))
    wire = [{**chunk, "id": str(i)} for i, chunk in enumerate(chunks)]
    options = {"threshold": args.threshold, "target_k": args.target_k}
    with DistillClient(args.url, api_key=args.api_key) as client:
        if not sys.stderr.isatty():
            result = client.dedupe(wire, **options)
        else:
            bars = StageBars(sys.stderr)
            try:
                result = client.dedupe(wire, on_progress=bars.update, **options)
            finally:
                bars.close()
    return [{**chunks[int(kept.id)], "cluster_id": kept.cluster_id} for kept in result.chunks]


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        kept = dedupe(args)
    except (DistillError, InputError) as error:
        print(f"distill: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"distill: cannot read {args.file}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    try:
        for chunk in kept:
            sys.stdout.write(json.dumps(chunk, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `distill dedupe f | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
