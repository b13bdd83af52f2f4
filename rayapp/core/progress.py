"""One progress line per long step: a live bar on a terminal, a few log lines otherwise (CI, Ray
job logs), so that a log file shows progress without thousands of redraws."""

from __future__ import annotations

import sys
import time

from rayapp.core.log import get_logger


class ProgressLine:
    def __init__(self, label: str, unit: str = "", every_s: float = 15.0):
        self.unit, self.every_s = unit, every_s
        stage, _, variant = label.partition(" ")
        self.log = get_logger(f"rayapp.{stage}")
        self.prefix = f"{variant} " if variant else ""
        self.bar = None
        self.last_log = 0.0
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=f"[{label}]", unit=f" {unit}" if unit else "it", dynamic_ncols=True, leave=True)

    def update(self, done: int, total: int, detail: str = "") -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.set_postfix_str(detail, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s or done >= total:
            self.last_log = now
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            self.log.info("%s%d/%d %s%s%s", self.prefix, done, total, self.unit, pct, f", {detail}" if detail else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
