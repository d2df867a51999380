"""The Dockerfile read as stages, for the tests of the image and of what runs in it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from tests.support import REPO


@dataclass
class Stage:
    """One stage of the Dockerfile: its instructions, continuation lines joined."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def env(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for line in self.args("ENV") for item in shlex.split(line))
        return dict(pairs)


def dockerfile_stages() -> list[Stage]:
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # hadolint keeps comments out of continuations
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 else None))
        else:
            stages[-1].instructions.append((instruction, " ".join(args.split())))
    return stages
