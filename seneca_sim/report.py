"""What a counting run found: actions, energy and cycles per token, layer and core, as tidy DataFrames.

A :class:`Report` holds the raw counts (numpy) and builds long-format DataFrames on demand:

* ``by_token_layer()``  token x layer x action: count, energy_pJ (always kept)
* ``per_core()``        token x layer x core x action: count, energy_pJ (kept when small enough;
                        ``simulate(per_core=True)`` forces it)
* ``core_totals()``     core x layer x action summed over tokens
* ``cycles()``          token x phase: cycles (the latency model of ``seneca_sim.counting``)
* ``tokens()``          per token: energy, latency
* ``by_layer()``, ``by_action()`` per-token means; ``summary()`` energy/latency per token and the
  gains over the dense (every activation an event) and, if given, natural (threshold 0) baselines.

Layers are block indices; the head is layer ``n_layer``. ``leakage`` counts core-cycles.
``save(dir)`` writes CSV (or Parquet) files and ``summary.json`` atomically (a temporary directory
renamed into place).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seneca_sim.actions import ACTIONS, N_ACTIONS


@dataclass(frozen=True, eq=False)
class Report:
    meta: dict
    energy_per_action: np.ndarray      # [A] pJ per counted unit
    tok_layer: np.ndarray              # [T, n_layer + 1, A] counts
    phase_cycles: np.ndarray           # [T, P]
    phase_names: tuple[str, ...]
    phase_layer: np.ndarray
    item_core: np.ndarray              # items = (core, layer) pairs actions are booked on
    item_layer: np.ndarray
    item_totals: np.ndarray            # [n_items, A] summed over tokens
    tok_item: np.ndarray | None = None  # [T, n_items, A] when per-core detail was kept
    dense: dict = field(default_factory=dict)
    natural: dict | None = None

    actions = ACTIONS

    @staticmethod
    def from_counts(*, program, arch, tables, tok_layer, item_tot, phase_cycles, tok_item, dense, natural,
                    trace_name: str, assumed_dense_sites: list[str], binary_events: bool) -> "Report":
        meta = {
            "model": program.meta["model"], "arch": arch.chip.name, "arch_origin": str(arch.origin),
            "trace": trace_name, "n_tokens": int(tok_layer.shape[0]), "cores": program.n_cores,
            "chips": program.n_chips, "clock_hz": float(arch.clock_hz), "n_layer": int(program.meta["n_layer"]),
            "weight_format": program.meta["weight_format"], "binary_events": bool(binary_events),
            "macs_dense_per_token": int(program.meta["macs_per_token"]),
            "assumed_dense_sites": list(assumed_dense_sites),
        }
        return Report(meta=meta, energy_per_action=tables.energy.copy(), tok_layer=tok_layer,
                      phase_cycles=phase_cycles, phase_names=tuple(str(p) for p in program.phases.name),
                      phase_layer=np.asarray(program.phases.layer), item_core=tables.item_core,
                      item_layer=tables.item_layer, item_totals=item_tot, tok_item=tok_item,
                      dense=dense, natural=natural)

    # --- per token ------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.tok_layer.shape[0])

    def energy_pj(self) -> np.ndarray:
        """Energy of each token (pJ)."""
        return self.tok_layer.sum(axis=1) @ self.energy_per_action

    def latency_cycles(self) -> np.ndarray:
        return self.phase_cycles.sum(axis=1)

    def counts_per_token(self) -> np.ndarray:
        """Mean count of each action per token ``[A]``."""
        return self.tok_layer.sum(axis=(0, 1)) / max(self.n_tokens, 1)

    def tokens(self) -> pd.DataFrame:
        lat = self.latency_cycles()
        return pd.DataFrame({"token": np.arange(self.n_tokens), "energy_pJ": self.energy_pj(), "latency_cycles": lat,
                             "latency_us": lat / self.meta["clock_hz"] * 1e6,
                             "macs": self.tok_layer[:, :, ACTIONS.index("mac")].sum(axis=1)})

    # --- long tables ----------------------------------------------------------------------
    def by_token_layer(self) -> pd.DataFrame:
        """Long format: token, layer, action, count, energy_pJ (zero counts dropped)."""
        T, L, A = self.tok_layer.shape
        t, l, a = np.meshgrid(np.arange(T), np.arange(L), np.arange(A), indexing="ij")
        c = self.tok_layer.reshape(-1)
        keep = c != 0
        return pd.DataFrame({"token": t.reshape(-1)[keep], "layer": l.reshape(-1)[keep],
                             "action": np.asarray(ACTIONS)[a.reshape(-1)[keep]], "count": c[keep],
                             "energy_pJ": c[keep] * self.energy_per_action[a.reshape(-1)[keep]]})

    def per_core(self) -> pd.DataFrame:
        """Long format: token, layer, core, action, count, energy_pJ (zero counts dropped)."""
        if self.tok_item is None:
            raise ValueError("this report kept no per-core detail per token; rerun simulate(..., per_core=True) "
                             "or use core_totals() / by_token_layer()")
        t, i, a = np.nonzero(self.tok_item)
        c = self.tok_item[t, i, a].astype(np.float64)
        return pd.DataFrame({"token": t, "layer": self.item_layer[i], "core": self.item_core[i],
                             "action": np.asarray(ACTIONS)[a], "count": c, "energy_pJ": c * self.energy_per_action[a]})

    def core_totals(self) -> pd.DataFrame:
        """Long format summed over tokens: core, layer, action, count, energy_pJ."""
        i, a = np.nonzero(self.item_totals)
        c = self.item_totals[i, a]
        return pd.DataFrame({"core": self.item_core[i], "layer": self.item_layer[i], "action": np.asarray(ACTIONS)[a],
                             "count": c, "energy_pJ": c * self.energy_per_action[a]})

    def cycles(self) -> pd.DataFrame:
        """Long format: token, phase, layer, cycles."""
        T, P = self.phase_cycles.shape
        return pd.DataFrame({"token": np.repeat(np.arange(T), P), "phase": np.tile(np.asarray(self.phase_names), T),
                             "layer": np.tile(self.phase_layer, T), "cycles": self.phase_cycles.reshape(-1)})

    # --- breakdowns -----------------------------------------------------------------------
    def by_layer(self) -> pd.DataFrame:
        """Per-token means by layer and action: layer, action, count, energy_pJ."""
        mean = self.tok_layer.mean(axis=0)
        L, A = mean.shape
        lay, act = np.meshgrid(np.arange(L), np.arange(A), indexing="ij")
        df = pd.DataFrame({"layer": lay.reshape(-1), "action": np.asarray(ACTIONS)[act.reshape(-1)],
                           "count": mean.reshape(-1), "energy_pJ": (mean * self.energy_per_action).reshape(-1)})
        return df[df["count"] != 0].reset_index(drop=True)

    def by_action(self) -> pd.DataFrame:
        """Per-token means by action, with the dense baseline beside them."""
        c = self.counts_per_token()
        e = c * self.energy_per_action
        df = pd.DataFrame({"action": ACTIONS, "count": c, "energy_pJ": e, "share": e / max(e.sum(), 1e-300),
                           "pJ_per_unit": self.energy_per_action})
        if self.dense:
            df["dense_count"] = self.dense["counts"]
            df["dense_energy_pJ"] = self.dense["counts"] * self.energy_per_action
        return df

    def summary(self) -> dict[str, Any]:
        """Energy and latency per token (means), and the gains over the baselines."""
        us = 1e6 / self.meta["clock_hz"]
        e, lat = float(self.energy_pj().mean()), float(self.latency_cycles().mean())
        macs = float(self.counts_per_token()[ACTIONS.index("mac")])
        out = {
            "model": self.meta["model"], "trace": self.meta["trace"], "tokens": self.n_tokens,
            "cores": self.meta["cores"], "chips": self.meta["chips"],
            "energy_uJ_per_token": e / 1e6, "latency_us_per_token": lat * us,
            "macs_per_token": macs, "mac_sparsity": 1.0 - macs / self.meta["macs_dense_per_token"],
            "leakage_share": float(self.counts_per_token()[ACTIONS.index("leakage")]
                                   * self.energy_per_action[ACTIONS.index("leakage")] / e) if e else 0.0,
        }
        for label, ref in (("dense", self.dense), ("natural", self.natural)):
            if ref:
                out[f"{label}_energy_uJ_per_token"] = ref["energy_pj"] / 1e6
                out[f"{label}_latency_us_per_token"] = ref["latency_cycles"] * us
                out[f"energy_gain_vs_{label}"] = ref["energy_pj"] / e if e else float("nan")
                out[f"latency_gain_vs_{label}"] = ref["latency_cycles"] / lat if lat else float("nan")
        out["shared_read_bits_per_token"] = float(self.counts_per_token()[ACTIONS.index("shared_read_bit")])
        out["fetch"] = self.meta.get("fetch", "on core")
        out["streamed_matrices"] = len(self.meta.get("streamed", []))
        if self.meta["assumed_dense_sites"]:
            out["assumed_dense_sites"] = ", ".join(self.meta["assumed_dense_sites"])
        return out

    # --- saving ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, fmt: str = "csv") -> Path:
        """Write the tables (``csv`` or ``parquet``) and ``summary.json`` into ``directory``,
        replacing it atomically (written beside it, then renamed)."""
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("Parquet needs pyarrow (pip install pyarrow); or save as csv") from None
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tables = {"tokens": self.tokens(), "by_token_layer": self.by_token_layer(), "core_totals": self.core_totals(),
                  "cycles": self.cycles(), "by_layer": self.by_layer(), "by_action": self.by_action()}
        if self.tok_item is not None:
            tables["per_core"] = self.per_core()
        for name, df in tables.items():
            if fmt == "csv":
                df.to_csv(tmp / f"{name}.csv", index=False)
            else:
                df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "summary.json").write_text(json.dumps({"summary": self.summary(), "meta": self.meta}, indent=2,
                                                     default=float))
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out


__all__ = ["Report", "N_ACTIONS"]
