"""Candidate settings the measurement tries, per residual branch of a block.

A ladder of mixes from about 2.2 to 8 bits (group sizes as exllamav2's ``qparams.py`` uses
them); every rung gives each linear of a branch the same mix, and a second candidate lifts
the branch's most sensitive linear (declared per architecture family by module name, as
exllamav2 favours ``v_proj`` and ``down_proj``) to the next rung.
"""
from __future__ import annotations

from quantbench.config import EXL2GridConfig

LADDER = (
    "0.05:3b_64g/0.95:2b_64g",
    "0.25:3b_64g/0.75:2b_64g",
    "0.1:4b_128g/0.9:3b_128g",
    "1:4b_128g",
    "1:4b_32g",
    "0.1:5b_128g/0.9:4b_128g",
    "0.1:5b_32g/0.9:4b_32g",
    "0.1:6b_128g/0.9:5b_128g",
    "1:6b_128g",
    "0.1:8b_128g/0.9:6b_128g",
    "1:8b_128g",
)

SENSITIVE = ("self_attn.v_proj", "mlp.down_proj")


def branch_candidates(linears: list[str], ladder: tuple[str, ...] = LADDER
                      ) -> list[dict[str, str]]:
    """Candidates for one branch: ``{linear: mix desc}`` each, cheapest rung first."""
    for desc in ladder:
        EXL2GridConfig.from_desc(desc)  # refuse a malformed ladder early
    lifted = [lin for lin in linears if lin in SENSITIVE]
    out: list[dict[str, str]] = []
    for i, desc in enumerate(ladder):
        out.append({lin: desc for lin in linears})
        if lifted and i + 1 < len(ladder) and len(linears) > len(lifted):
            out.append({lin: ladder[i + 1] if lin in lifted else desc for lin in linears})
    return out
