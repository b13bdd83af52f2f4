"""Sources cut into blocks that can be read, normalised and templated independently (in this process
or as Ray Data tasks), with every row's outcome kept in source order.

A JSONL file is cut into byte ranges aligned to line starts (each line belongs to the block its
first byte falls in), a Parquet file into row groups; a JSON array or an HF dataset is one block.
A block reports its rows' positions relative to itself and how many lines (or rows) it spans, so
the driver turns them into file line numbers (or row indices) with a running sum, exactly as one
sequential read would number them. Schema detection and de-duplication need the rows before a
block, so the driver does them: detection once per source before the blocks run (``detect``), and
de-duplication over the outcomes in source order afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from rayapp.config import TemplateConfig
from rayapp.core import storage
from rayapp.core.template import PromptFormatter
from rayapp.stages.prepare.normalize import RowError, detect_schema, normalize_row
from rayapp.stages.prepare.readers import RawRow, UnreadableSourceError, detect_format, iter_jsonl, iter_rows

NO_SCHEMA = ("cannot tell the schema: no 'output' (Alpaca), 'response' (Dolly), 'messages' (OpenAI chat) or "
             "'conversations' (ShareGPT) field")


@dataclass(frozen=True)
class Block:
    source: int  # position of the source in data.sources
    index: int  # position of the block in its source
    path: str
    fmt: str  # the detected format
    split: str
    start: int = 0  # jsonl: byte offset; parquet: first row group
    stop: int | None = None  # exclusive; None: to the end


@dataclass
class Outcome:
    """One raw row: kept (``reason`` None) or rejected, at ``row`` relative to its block."""

    row: int
    row_kind: str
    id: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    prompt: str | None = None  # Alpaca rows: the templated prompt; conversations: filled in when tokenized
    messages: list[dict] | None = None
    field: str | None = None
    reason: str | None = None
    raw: str | None = None


@dataclass
class BlockResult:
    block: Block
    outcomes: list[Outcome]
    span: int  # lines (jsonl) or rows the block covers: the next block's numbering starts after them
    error: str | None = None  # the whole source is unreadable


def plan_blocks(source: int, path: str, fmt: str, split: str, block_bytes: int) -> list[Block]:
    fmt = detect_format(path, fmt)
    if fmt == "jsonl" and not path.endswith(".gz"):
        fs, p = storage.resolve(path)
        info = fs.get_file_info(p)
        if info.size is None:
            raise UnreadableSourceError(f"{path}: file not found")
        n = max(1, -(-info.size // block_bytes))
        return [Block(source, i, path, fmt, split, i * block_bytes, min((i + 1) * block_bytes, info.size))
                for i in range(n)]
    if fmt == "parquet" and storage.exists(path):
        import pyarrow.parquet as pq

        fs, p = storage.resolve(path)
        try:
            with fs.open_input_file(p) as f:
                groups = pq.ParquetFile(f).metadata.num_row_groups
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise UnreadableSourceError(f"{path}: not a readable Parquet file: {exc}") from None
        return [Block(source, i, path, fmt, split, i, i + 1) for i in range(max(groups, 1))]
    return [Block(source, 0, path, fmt, split)]


def _line_start_at_or_after(f, size: int, offset: int) -> int:
    """The first position >= ``offset`` where a line starts (``size`` if none)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)
    pos = offset - 1
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return size
        i = chunk.find(b"\n")
        if i >= 0:
            return min(pos + i + 1, size)
        pos += len(chunk)


def raw_rows(block: Block) -> tuple[Iterator[RawRow], int]:
    """The block's raw rows (numbered from 1 for JSONL lines, 0 for rows, relative to the block) and
    the number of lines or rows it spans."""
    if block.fmt == "jsonl" and block.stop is not None:
        fs, p = storage.resolve(block.path)
        with fs.open_input_file(p) as f:
            size = f.size()
            lo = _line_start_at_or_after(f, size, block.start)
            hi = _line_start_at_or_after(f, size, block.stop)
            f.seek(lo)
            data = f.read(hi - lo)
        span = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        return iter_jsonl(block.path, data), span
    if block.fmt == "parquet" and block.stop is not None:
        import pyarrow.parquet as pq

        fs, p = storage.resolve(block.path)
        with fs.open_input_file(p) as f:
            table = pq.ParquetFile(f).read_row_groups(list(range(block.start, block.stop)))
        return (RawRow(block.path, i, "row", obj) for i, obj in enumerate(table.to_pylist())), table.num_rows
    rows = list(iter_rows(block.path, block.fmt, block.split))
    return iter(rows), len(rows)


def detect(blocks: list[Block]) -> tuple[str | None, tuple[int, int] | None]:
    """A source's schema, from its first row that shows one, and where that row is (block index,
    position in the block's raw rows); rows with data before it cannot be normalised."""
    for block in blocks:
        rows, _ = raw_rows(block)
        for pos, raw in enumerate(rows):
            if raw.data is not None:
                schema = detect_schema(raw.data)
                if schema is not None:
                    return schema, (block.index, pos)
    return None, None


def process_block(block: Block, schema: str | None, detected_at: tuple[int, int] | None, max_chars: int,
                  template: TemplateConfig, max_rows: int | None = None) -> BlockResult:
    """Read, normalise and template one block (at most ``max_rows`` raw rows: a source's limit)."""
    try:
        rows, span = raw_rows(block)
        fmt = PromptFormatter(template)
        out: list[Outcome] = []
        for pos, raw in enumerate(rows):
            if max_rows is not None and pos >= max_rows:
                break
            if raw.data is None:
                out.append(Outcome(raw.row, raw.row_kind, field=raw.field, reason=raw.error or "unreadable row",
                                   raw=raw.raw))
                continue
            if detected_at is None or (block.index, pos) < detected_at:
                out.append(Outcome(raw.row, raw.row_kind, reason=NO_SCHEMA, raw=raw.raw))
                continue
            try:
                norm = normalize_row(raw.data, schema, max_chars)
            except RowError as err:
                preview = raw.raw or json.dumps(raw.data, ensure_ascii=False, default=str)[:300]
                out.append(Outcome(raw.row, raw.row_kind, field=err.field, reason=err.reason, raw=preview))
                continue
            prompt = None if norm.messages is not None else fmt.prompt(norm.instruction, norm.input)
            out.append(Outcome(raw.row, raw.row_kind, norm.id, norm.instruction, norm.input, norm.output,
                               prompt, norm.messages))
        return BlockResult(block, out, span)
    except UnreadableSourceError as exc:
        return BlockResult(block, [], 0, error=str(exc))
