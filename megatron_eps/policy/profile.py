"""The per-GPU profile file: its schema, its lookup and its one cache.

One file per GPU, ``megatron_eps/profiles/<gpu slug>.json`` (or the ``cost_profile`` setting),
written by ``megatron-eps-calibrate``. Sections:

* ``experts``: expert-kernel cost tables (``policy.kernel_tables.CostProfile``);
* ``pipeline``: the cost model's constants (``PipelineProfile``);
* ``links``: per transport (``nccl``, ``copy_engine``), the link figures that replace the
  pipeline section's when a layer runs on that transport;
* ``provenance``: where each figure came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Dict, Optional

from megatron_eps.errors import EPSConfigError
from megatron_eps.policy.kernel_tables import (PROFILE_FORMAT, CostProfile, device_name, gpu_slug,
                                              read_cost_profile_json)

PROFILES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")


@dataclass(frozen=True)
class PipelineProfile:
    """Calibrated constants of the pipeline cost model for one GPU and link.

    link_bandwidth_gbps: all-to-all bytes per second per rank, in GB/s (one direction).
    link_latency_us: fixed cost of one all-to-all call.
    chunk_overhead_us: k, the extra time each additional chunk costs (launches, regrouping,
        smaller GEMMs, the host issuing more work), measured to be linear in N as in the paper.
    expert_tflops: achieved expert-GEMM throughput used when no kernel cost table is given.
    chunk_overhead_base_us: b, a fixed cost of pipelining at all (N > 1).
    memory_bandwidth_gbps: device memory bandwidth for weight-bound (small-load) expert GEMMs;
        None: FLOPs only.
    overlap_efficiency: fraction of the ideally hidden time that overlap really hides (GEMMs
        slow down beside a communication kernel; 1.0 = ideal).
    comm_inflation_eps / gemm_inflation_eps: eps0 / eps1 of the paper's enable condition.
    host_chunk_us: host time to issue one chunk (dispatch, experts, combine calls). The GPU
        cannot run ahead of the host, so a layer takes at least ``host_base_us + host_chunk_us
        * N``; 0 ignores the host.
    host_base_us: host time of the layer that does not depend on N (router, permutation, the
        count matrix's sync, the unpermutation), measured with host_chunk_us.
    min_gain: ``auto`` pipelines only when the predicted time beats one chunk's by at least
        this fraction (hysteresis against the model's error; 0: any predicted gain).
    sm_count: SMs of the GPU; with ``gemm_sm_carveout`` the GEMMs of an overlapped plan get
        ``sm_count - carveout`` of them, so their time is scaled by ``sm_count / (sm_count -
        carveout)``. None: the carve-out is not modeled.
    link_piece_us: fixed time of each copy a copy-engine transport issues (one per peer and
        expert of a chunk), on top of ``link_latency_us`` per chunk; 0 for NCCL.
    use_kernel_tables: time the expert GEMMs with the profile's kernel tables (its ``experts``
        section) where it has them; false: with ``expert_tflops`` and ``memory_bandwidth_gbps``,
        for constants that were fitted against that roofline.
    """

    link_bandwidth_gbps: float
    link_latency_us: float
    chunk_overhead_us: float
    expert_tflops: float
    source: str = "unspecified"
    chunk_overhead_base_us: float = 0.0
    memory_bandwidth_gbps: Optional[float] = None
    overlap_efficiency: float = 1.0
    comm_inflation_eps: float = 0.32
    gemm_inflation_eps: float = 0.03
    host_chunk_us: float = 0.0
    host_base_us: float = 0.0
    min_gain: float = 0.0
    sm_count: Optional[float] = None
    link_piece_us: float = 0.0
    use_kernel_tables: bool = True

    _REQUIRED = ("link_bandwidth_gbps", "link_latency_us", "chunk_overhead_us", "expert_tflops")

    def __post_init__(self):
        for name in ("link_bandwidth_gbps", "expert_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pipeline profile {name} must be > 0, got {getattr(self, name)}")
        for name in (
            "link_latency_us",
            "chunk_overhead_us",
            "chunk_overhead_base_us",
            "host_chunk_us",
            "host_base_us",
            "link_piece_us",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"pipeline profile {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not 0.0 <= self.overlap_efficiency <= 1.0:
            raise ValueError(f"overlap_efficiency must be in [0, 1], got {self.overlap_efficiency}")

    @classmethod
    def from_dict(cls, section: dict, source: str = "dict") -> "PipelineProfile":
        missing = [k for k in cls._REQUIRED if k not in section]
        if missing:
            raise ValueError(
                f"eps cost_profile {source!r} lacks pipeline key(s) {', '.join(missing)}; "
                f"expected keys: {', '.join(cls._REQUIRED)}"
            )
        known = {f.name for f in fields(cls)} - {"source"}
        values = {k: section[k] for k in known if k in section and section[k] is not None}
        for k, v in list(values.items()):
            values[k] = v if k == "use_kernel_tables" else float(v)
        if not isinstance(values.get("use_kernel_tables", True), bool):
            raise ValueError(f"eps cost_profile {source!r}: use_kernel_tables must be true or false, "
                             f"got {values['use_kernel_tables']!r}")
        return cls(source=source, **values)

    @classmethod
    def from_json(cls, path: str) -> "PipelineProfile":
        with open(path) as f:
            data = json.load(f)
        return cls.from_dict(data.get("pipeline", data), source=path)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


@dataclass
class ProfileFile:
    """One profile file, read and checked once per version of the file (the one cache)."""

    path: str
    experts: Optional[object]  # the expert-kernel tables (kernel_tables.CostProfile)
    pipeline: Optional[PipelineProfile]
    links: Dict[str, dict]
    devices: list
    per_transport: Dict[str, PipelineProfile] = dataclasses.field(default_factory=dict)

    def holds(self) -> dict:
        return {"kernel_tables": self.experts is not None, "pipeline": self.pipeline is not None,
                "devices": self.devices}

    def pipeline_for(self, transport: Optional[str]) -> Optional[PipelineProfile]:
        """The pipeline constants with ``links[transport]``'s figures, where the file has them."""
        link = self.links.get(transport) if transport else None
        if self.pipeline is None or not link:
            return self.pipeline
        if transport not in self.per_transport:
            known = {f.name for f in fields(PipelineProfile)} - {"source"}
            unknown = sorted(set(link) - known)
            if unknown:
                raise EPSConfigError(
                    f"eps cost_profile {self.path!r}: links.{transport} has unknown key(s) "
                    f"{', '.join(unknown)}"
                )
            self.per_transport[transport] = dataclasses.replace(
                self.pipeline, source=f"{self.path} [{transport}]",
                **{k: float(v) for k, v in link.items()},
            )
        return self.per_transport[transport]


_FILES: Dict[tuple, ProfileFile] = {}


def open_profile(path: str) -> ProfileFile:
    """The profile file at ``path``, checked; cached per version (path, mtime, size).

    A profile holds expert-kernel cost tables (``"format": "megatron-eps-cost-profile"``, at top
    level or under ``"experts"``), pipeline constants (a ``"pipeline"`` section), or both, as
    megatron-eps-calibrate writes them. Anything else (corrupt JSON, a list, ``{}``, malformed
    tables) raises EPSConfigError naming ``cost_profile``.
    """
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise EPSConfigError(f"eps cost_profile={path!r} cannot be read: {exc}") from None
    if key not in _FILES:
        _FILES[key] = _read_profile(path)
    return _FILES[key]


def check_cost_profile_file(path: str) -> dict:
    """``{"kernel_tables": bool, "pipeline": bool, "devices": [names the profile was measured
    on]}`` for a usable profile file; EPSConfigError naming ``cost_profile`` otherwise."""
    return open_profile(path).holds()


def _read_profile(path: str) -> ProfileFile:
    data = read_cost_profile_json(path)

    devices = []
    kernel = tables = None
    if data.get("format") == PROFILE_FORMAT:
        kernel = data
    elif isinstance(data.get("experts"), dict):
        kernel = data["experts"]
    elif "format" in data:
        raise EPSConfigError(
            f"eps cost_profile={path!r}: format={data.get('format')!r} is not a megatron-eps "
            f"cost profile; allowed: {PROFILE_FORMAT!r} (written by megatron-eps-calibrate)"
        )
    if kernel is not None:
        try:
            tables = CostProfile(kernel, path)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise EPSConfigError(
                f"eps cost_profile={path!r}: malformed expert-kernel tables ({type(exc).__name__}: "
                f"{exc}); write a new one with megatron-eps-calibrate"
            ) from None
        if not tables.tables and not isinstance(data.get("pipeline"), dict):
            raise EPSConfigError(
                f"eps cost_profile={path!r}: the expert-kernel tables hold no measurements; "
                "write a new one with megatron-eps-calibrate"
            )
        devices.append(tables.device_name)
    section = data.get("pipeline")
    pipeline = None
    if section is not None or all(k in data for k in PipelineProfile._REQUIRED):
        section = data if section is None else section
        if not isinstance(section, dict):
            raise EPSConfigError(
                f"eps cost_profile={path!r}: 'pipeline' must be a JSON object, got "
                f"{type(section).__name__}"
            )
        try:
            pipeline = PipelineProfile.from_dict(section, source=path)
        except (KeyError, TypeError, ValueError) as exc:
            raise EPSConfigError(
                f"eps cost_profile={path!r}: malformed pipeline section ({exc})"
            ) from None
        device = (data.get("provenance") or {}).get("device") if isinstance(
            data.get("provenance"), dict) else None
        if isinstance(device, str) and device not in devices:
            devices.append(device)
    if kernel is None and pipeline is None:
        raise EPSConfigError(
            f"eps cost_profile={path!r} holds neither expert-kernel tables (format "
            f"{PROFILE_FORMAT!r}, from megatron-eps-calibrate) nor pipeline constants (a "
            f"'pipeline' section with {', '.join(PipelineProfile._REQUIRED)}, from "
            "megatron-eps-calibrate pipeline)"
        )
    links = data.get("links", {})
    return ProfileFile(path=path, experts=tables, pipeline=pipeline,
                       links=links if isinstance(links, dict) else {}, devices=devices)


_WARNED_DEVICES: set = set()


def warn_if_profile_for_other_device(path: Optional[str], device_name: str, log=None) -> bool:
    """Warn once per (profile, device) when ``path`` was measured on another device.

    A profile for another device is accepted (it may be the best estimate there is, e.g. H100
    tables on an H200), but its figures are that device's: the warning says so. Expert-kernel
    tables of another device are not used by ``expert_kernel: auto`` (the documented default
    order is); pipeline constants are. Returns True if the devices differ.
    """
    if not path:
        return False
    devices = check_cost_profile_file(path)["devices"]
    if not devices or device_name in devices:
        return False
    key = (os.path.abspath(path), device_name)
    if key not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(key)
        import logging

        (log or logging.getLogger("megatron_eps")).warning(
            "eps cost_profile=%r was measured on %s, this run is on %r: its expert-kernel "
            "tables are not used (expert_kernel auto takes the default order) and its pipeline "
            "constants may be off; calibrate this device with megatron-eps-calibrate",
            path, " / ".join(repr(d) for d in devices), device_name,
        )
    return True


def load_pipeline_profile(
    path: Optional[str], device, transport: Optional[str] = None
) -> Optional[PipelineProfile]:
    """The profile at ``path``, else the one shipped for this GPU (megatron_eps/profiles/).

    With ``transport`` ("nccl", "copy_engine"), the link figures calibrated for that transport
    (the file's ``links`` section: link_bandwidth_gbps, link_latency_us, overlap_efficiency,
    chunk_overhead_us) replace the pipeline section's, when the file has them.

    A file without the pipeline keys (e.g. a kernel-only cost table) gives None. A file that is
    no valid profile (corrupt JSON, a list, ``{}``, a malformed section) raises EPSConfigError
    naming ``cost_profile``; one measured on another device is used, with a warning (once).
    """
    if path is None:
        path = shipped_profile_path(device)
        if path is None:
            return None
    profile_file = open_profile(path)
    if profile_file.pipeline is not None and device is not None:

        warn_if_profile_for_other_device(path, device_name(device))
    return profile_file.pipeline_for(transport)


def load_kernel_tables(path: Optional[str], device):
    """The expert-kernel cost tables for ``device``: those of the file at ``path`` (the
    ``cost_profile`` setting), else those shipped for this GPU, else (a CUDA GPU with no
    profile of its own) those of the nearest known GPU, marked ``borrowed_for`` this GPU; None
    when there are none. A profile measured on another device is used with a warning (once);
    its tables then do not cover this device (``CostProfile.covers``)."""

    if path:
        if not os.path.isfile(path):
            raise EPSConfigError(
                f"eps cost_profile={path!r}: no such file (write one with megatron-eps-calibrate)")
        warn_if_profile_for_other_device(path, device_name(device))
    for candidate in (path, shipped_profile_path(device)):
        if candidate and open_profile(candidate).experts is not None:
            return open_profile(candidate).experts
    return _borrowed_tables(device)


_BORROWED: Dict[str, object] = {}


def _borrowed_tables(device):
    """The nearest known GPU's kernel tables, standing in for a CUDA device that has none."""
    import copy
    import logging

    import torch

    if device is None or torch.device(device).type != "cuda":
        return None

    name = device_name(device)
    if name not in _BORROWED:
        index = torch.device(device).index
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        nearest = nearest_profile_path((props.major, props.minor), props.multi_processor_count)
        tables = None
        if nearest is not None:
            tables = copy.copy(open_profile(nearest).experts)  # the file's own stays unmarked
            tables.borrowed_for = name
            logging.getLogger(__name__).info(
                "megatron-eps: no kernel tables for %s; ranking the expert kernels with %s's (%s) "
                "and timing the close ones on first use", name, tables.device_name, nearest)
        _BORROWED[name] = tables
    return _BORROWED[name]


def nearest_profile_path(capability, sm_count: int, profiles_dir: str = PROFILES_DIR) -> Optional[str]:
    """The shipped profile with kernel tables of the GPU most like one with this compute
    capability and SM count (same capability first, then the nearest SM count), or None."""
    import math

    best = None
    for name in sorted(os.listdir(profiles_dir)) if os.path.isdir(profiles_dir) else []:
        path = os.path.join(profiles_dir, name)
        if not name.endswith(".json"):
            continue
        try:
            with open(path) as f:
                device = json.load(f)["experts"]["device"]
            score = (tuple(device["capability"]) != tuple(capability),
                     abs(math.log(float(device["sm_count"]) / max(sm_count, 1))))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue  # not a profile with kernel tables and device facts
        if best is None or score < best[0]:
            best = (score, path)
    return best[1] if best else None


def shipped_profile_path(device) -> Optional[str]:
    """megatron_eps/profiles/<gpu name slug>.json for a CUDA device, if it exists: the one
    profile file per GPU, with ``experts`` (kernel tables), ``pipeline`` and ``links`` sections.
    """
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    slug = gpu_slug(torch.cuda.get_device_name(device))
    path = os.path.join(PROFILES_DIR, f"{slug}.json")
    return path if os.path.isfile(path) else None


def profile_path_for(out: str, device_name: str) -> str:
    """``out`` itself, or ``out/<gpu slug>.json`` when ``out`` is a directory (an existing one,
    or a path ending in a separator, created when the profile is written)."""
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return os.path.join(out, f"{gpu_slug(device_name)}.json")
    return out


def write_profile_sections(path: str, experts: Optional[dict] = None,
                           pipeline: Optional[dict] = None, links: Optional[dict] = None,
                           provenance: Optional[dict] = None) -> dict:
    """Merge sections into the profile file at ``path`` (created if missing) and check it.

    ``experts`` replaces the kernel tables; ``pipeline`` and ``provenance`` update their
    sections key by key; ``links`` replaces the figures of the transports it names. A file that
    holds kernel tables at top level (a kernel-only profile) keeps them, under ``experts``.
    """
    data: dict = {}
    if os.path.isfile(path):
        data = read_cost_profile_json(path)
        if "format" in data:  # kernel tables at top level
            data = {"experts": data}
    if experts is not None:
        data["experts"] = experts
    for name, section in (("pipeline", pipeline), ("links", links), ("provenance", provenance)):
        if section:
            data.setdefault(name, {}).update(section)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    check_cost_profile_file(path)
    return data
