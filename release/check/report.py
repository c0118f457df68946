"""A check's result: each check passed, failed or skipped (with why), and vLLM's verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..serving.rules import ServeVerdict


@dataclass(frozen=True)
class CheckItem:
    check: str
    ok: bool
    message: str
    skipped: bool = False


@dataclass
class CheckReport:
    path: str
    group_size: int | None
    items: list[CheckItem] = field(default_factory=list)
    vllm: list[ServeVerdict] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    hashed: bool = True
    # entries the `files` check refused (links, sub-folders, other non-regular entries): said
    # once there, and never read as the file they are named for
    rejected: set[str] = field(default_factory=set)

    @property
    def failures(self) -> list[CheckItem]:
        return [i for i in self.items if not i.ok and not i.skipped]

    @property
    def skipped(self) -> list[CheckItem]:
        return [i for i in self.items if i.skipped]

    @property
    def passed(self) -> bool:
        return not self.failures

    def fail(self, check: str, message: str) -> None:
        self.items.append(CheckItem(check, False, message))

    def ok(self, check: str, message: str) -> None:
        self.items.append(CheckItem(check, True, message))

    def skip(self, check: str, why: str) -> None:
        """A check that did not run, and why (never counted as passed)."""
        self.items.append(CheckItem(check, False, why, skipped=True))

    def diagnose(self, check: str, message: str) -> None:
        """A failure that explains others: listed before every other failure."""
        first = next((n for n, i in enumerate(self.items) if not i.ok and not i.skipped), len(self.items))
        self.items.insert(first, CheckItem(check, False, message))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "group_size": self.group_size,
            "tensors": self.tensors,
            "shards": self.shards,
            "hashed": self.hashed,
            "checks": [asdict(i) for i in self.items],
            "skipped": [f"{i.check}: {i.message}" for i in self.skipped],
            "vllm": [v.to_json() for v in self.vllm],
        }

    def to_text(self, verbose: bool = False) -> str:
        counts = f" ({self.tensors} tensors in {self.shards} shards)" if self.shards else ""
        lines = [f"{self.path}: {'PASSED' if self.passed else 'FAILED'}{counts}"]
        for i in self.items:
            if i.skipped:
                lines.append(f"  skip [{i.check}] skipped: {i.message}")
            elif verbose or not i.ok:
                lines.append(f"  {'ok  ' if i.ok else 'FAIL'} [{i.check}] {i.message}")
        if not self.hashed:
            lines.append("  hashes: skipped (--no-hash); sizes were compared")
        if self.vllm:
            lines.append("  vLLM serving (bf16 activations), per tensor-parallel size:")
            for v in self.vllm:
                if v.target.startswith("Hopper") or verbose:
                    lines.append(f"    [{v.target}] {v.summary()}")
        return "\n".join(lines)
