"""The acceptance-signature probe against a pool bundle, as an attacker runs it (docs/security.md).

    python -m bench.member_probe --data-dir ../shared/data --bundle models/mnist-pool

Probe inputs (test digits shifted by 3-5 pixels or with their centre blacked out) that some members
accept and others reject are chosen on the core; one request holding them gives an accept/reject
"signature". The script sends that request through the gateway (in-process, embedded classifier, scores
and probabilities hidden) under many session ids and under many API keys, and prints how the signatures
map to members in each binding mode.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.defense import Defense
from service.settings import Settings
from training.data import load_mnist


def choose_probes(core: Defense, x: np.ndarray, k: int = 5) -> tuple[np.ndarray, dict[int, tuple]]:
    occluded = x.copy()
    occluded[:, :, 10:18, 10:18] = 0
    candidates = np.concatenate([np.roll(x, s, axis=3) for s in (3, 4, 5)] + [occluded])
    rejected = np.stack([core.inspect(candidates, member=m).rejected for m in range(len(core.members))], 1)
    varying = np.flatnonzero(rejected.any(1) & ~rejected.all(1))
    chosen: list[int] = []
    for _ in range(k):
        best = max(varying, key=lambda i: len({tuple(rejected[j, m] for j in chosen + [i])
                                               for m in range(rejected.shape[1])}))
        if best not in chosen:
            chosen.append(int(best))
    print(f"{len(varying)} of {len(candidates)} candidate inputs are accepted by some members and rejected by others")
    return candidates[chosen], {m: tuple(bool(rejected[j, m]) for j in chosen) for m in range(rejected.shape[1])}


def signatures(client: TestClient, probe: np.ndarray, header_sets: list[dict]) -> list[tuple]:
    out = []
    for headers in header_sets:
        r = client.post("/classify", json={"inputs": probe.tolist()}, headers=headers)
        r.raise_for_status()
        out.append(tuple(res["rejected"] for res in r.json()["results"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--bundle", type=Path, default=Path("models/mnist-pool"))
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--keys", type=int, default=64)
    args = p.parse_args(argv)

    core = Defense(args.bundle, device="cpu")
    n = len(core.members)
    probe, by_member = choose_probes(core, load_mnist(args.data_dir, download=False).test.x[:256])
    member_of = {sig: m for m, sig in by_member.items()}
    print(f"probe of {len(probe)} inputs; distinct member signatures: {len(set(by_member.values()))} of {n} members")
    secret = "member-probe-secret-0123456789"
    common = dict(bundle=args.bundle, session_secret=secret, rejection_limit="0")

    sessions = [{"X-Session-ID": f"s{i}"} for i in range(args.sessions)]
    with TestClient(create_app(Settings(member_by="session", **common), registry=CollectorRegistry())) as c:
        seen = signatures(c, probe, sessions)
    members = Counter(member_of.get(s) for s in seen)
    print(f"session binding: {args.sessions} session ids -> {len(set(seen))} signatures, "
          f"members {dict(sorted(members.items(), key=lambda kv: str(kv[0])))}")

    keys = {f"k{i}": f"probe-key-{i:04d}-0123456789" for i in range(args.keys)}
    key_list = ",".join(f"{k}:{v}" for k, v in keys.items())
    with TestClient(create_app(Settings(api_keys=key_list, **common), registry=CollectorRegistry())) as c:
        one_key = signatures(c, probe, [{"X-API-Key": keys["k0"], **h} for h in sessions])
        per_key = signatures(c, probe, [{"X-API-Key": key} for key in keys.values()])
    print(f"key binding: one key under {args.sessions} session ids -> {len(set(one_key))} signature(s)")
    members = Counter(member_of.get(s) for s in per_key)
    print(f"key binding: {args.keys} keys -> members {dict(sorted(members.items(), key=lambda kv: str(kv[0])))}")
    for q in (0.5, 0.9, 0.95, 0.99):
        print(f"keys an attacker needs for a {q:.0%} chance that one is bound to a chosen member: "
              f"{math.ceil(math.log(1 - q) / math.log(1 - 1 / n))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
