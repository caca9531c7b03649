"""Which profile each card people run would get, and how that choice was verified: the table in
README.md and docs/profiles.md ("Cards").

For each listed card (shared/cards.py) with a typical host, the chooser's answer from the shipped
profile table, judged by the card's architecture, and one verification level:

- measured on H100 under cap: the row the choice rests on ran on that architecture (sm_90);
- emulated on H100: it ran on an H100 playing the card's architecture (ZFARM_EMULATE_ARCH);
- compiled for the arch only: it ran on an H100 as itself; the profile's hand-written Triton kernels
  compile for the card's architecture (tests/test_kernels_for_every_arch.py), nothing more;
- not verified: no profile fits, or nothing above holds.

  python -m bench.coverage            # print the markdown table
  python -m bench.coverage --check F  # exit 1 unless F holds the current table between its markers
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared import archs, cards, profiles
from shared.errors import ProfileError

BEGIN, END = "<!-- cards:begin (python -m bench.coverage) -->", "<!-- cards:end -->"
# Host RAM (GB) each card is typically paired with: the four machines of the low-VRAM recipe, and what
# cloud instances carrying the others offer.
TYPICAL_HOST_GB = {"RTX 3060 12GB": 16, "RTX 4060 Ti 16GB": 32, "RTX 3090 24GB": 32, "RTX 4090 24GB": 64,
                   "RTX 5090 32GB": 64, "RTX 2080 Ti 11GB": 32, "T4 16GB": 32, "A10 24GB": 64, "L4 24GB": 64,
                   "A40 48GB": 128, "L40S 48GB": 128, "A100 40GB": 128, "A100 80GB": 128, "H100 SXM 80GB": 256,
                   "H100 PCIe 80GB": 256, "H200 141GB": 256, "B200 180GB": 256}


def verification(row: dict, card: cards.Card, profile: str) -> str:
    if not row:
        return "not verified"
    if row.get("emulated_arch") == card.arch:
        return f"emulated {card.arch} on {row.get('device', 'H100')}"
    if row.get("arch") == card.arch:
        return f"measured on {row.get('device', 'H100')} under cap"
    from worker.engine import specs

    spec = specs.spec_for(profile)
    if spec.gate_kernel or spec.qk_kernel:
        return "compiled for the arch only (hand-written kernels; run on sm_90)"
    return f"not verified on {card.arch} (run on {row.get('arch') or 'sm_90'})"


def rows(table: dict) -> list[dict]:
    out = []
    for card in cards.CARDS:
        ram_gb = TYPICAL_HOST_GB.get(card.name, 64)
        vram_class = profiles.class_for_vram(card.vram_gb * 0.97)
        caps = archs.capabilities(card.arch, (table.get("measured") or {}).get("torch", ""), "bundled")
        try:
            choice = profiles.choose(table, vram_class, ram_gb, caps=caps)
        except ProfileError:
            why = profiles.why_none(profiles.assess(table, vram_class, ram_gb, caps=caps)[1])
            out.append({"card": card.name, "arch": card.arch, "host_gb": ram_gb, "class": vram_class,
                        "profile": None, "expected": None, "verified": f"refused at boot: {why}"})
            continue
        row = profiles.row_for(table, choice)
        expected = cards.expected_s_per_image(row, card)
        out.append({"card": card.name, "arch": card.arch, "host_gb": ram_gb, "class": vram_class,
                    "profile": choice.profile, "expected": expected["s_per_image"] if expected else None,
                    "verified": verification(row, card, choice.profile)})
    return out


def markdown(table: dict) -> str:
    lines = [BEGIN, "| card | arch | host RAM | class | profile | expected s/img (model) | how verified |",
             "|---|---|---|---|---|---|---|"]
    for r in rows(table):
        label = profiles.class_label(r["class"]) if r["class"] is not None else "-"
        expected = f"{r['expected']:g}" if r["expected"] is not None else "-"
        lines.append(f"| {r['card']} | {r['arch']} | {r['host_gb']} GB | {label} | "
                     f"{'`' + r['profile'] + '`' if r['profile'] else '-'} | {expected} | {r['verified']} |")
    return "\n".join(lines + [END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", action="append", default=[],
                        help="exit 1 unless FILE holds the current table")
    args = parser.parse_args(argv)
    text = markdown(profiles.load_table())
    if not args.check:
        print(text, end="")
        return 0
    stale = [f for f in args.check if text not in Path(f).read_text()]
    for f in stale:
        print(f"{f}: the cards table is out of date; paste `python -m bench.coverage` between its markers",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
