"""A kind of protected set in one module: each expert's last block kept in high precision (a fixed rule)."""

import re

from sensq.ablate import ProtectedSet, SetBuilder, SetKind, register_set_builder, unregister_set_builder
from sensq.plan import Rule


def last_block(context) -> list[ProtectedSet]:
    family = context.model.family
    block = f"{family.blocks}.{context.n_blocks - 1}"
    rules = [Rule(f"re:{expert}:{re.escape(block)}\\..*", None, None, "the last block") for expert in context.experts]
    return [ProtectedSet("last block", context.with_the_rest(rules), SetKind.FIXED)]


def register() -> None:
    register_set_builder(SetBuilder("last-block", last_block, "each expert's last block kept"))


def unregister() -> None:
    unregister_set_builder("last-block")


register()
