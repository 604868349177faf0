"""Loop closure's appearance search for `make bench`: which global descriptor finds revisits, and its cost.

**Revisits.** Keyframes every 15 cm (the node's ``keyframe.min_translation_m``) along three
loops of synthetic scenes, rendered small. A real robot never drives the same line twice, nor
under the same light: each later pass is rendered beside the first (25 cm to the side, turned
by 8 degrees, the other way on the third pass) with another exposure (x0.75, x1.25) and sensor
noise. For every keyframe, as :meth:`LoopCloser.propose` asks, the stored keyframes at least
``min_gap_keyframes`` older are ranked by descriptor similarity. A keyframe of a later pass is
found at top-1 (top-3) when that earlier keyframe (one of those three) is a true revisit: camera
within 1 m and 45 degrees. Precision counts, over all keyframes of all passes (the first pass has
no revisit to find, so anything it accepts is false), the top-1 candidates at or above
``LoopConfig.min_similarity`` that are true revisits.

**Cost.** Describing one image at the stored size (``LoopConfig.image_width``), and, at 2000
stored keyframes, :meth:`KeyframeMemory.similar` and :meth:`LoopCloser.propose` per call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import make_pose
from mapany_ros.core.placement.loops import LoopCloser, LoopConfig
from mapany_ros.core.placement.loops.descriptors import DESCRIPTORS, describe, similarities
from mapany_ros.sim.scene import SyntheticScene, make_camera_model

#: Per pass: (metres to the left, yaw degrees, exposure gain). The first pass is the reference.
PASS_CHANGES = ((0.0, 0.0, 1.0), (0.25, 8.0, 0.75), (-0.25, -8.0, 1.25))
NOISE_SIGMA = 3.0  # grey levels
#: A true revisit: cameras this close.
REVISIT_M, REVISIT_DEG = 1.0, 45.0


@dataclass
class Keyframes:
    images: list[np.ndarray]
    T_world_camera: np.ndarray  # (n, 4, 4)
    passes: np.ndarray  # (n,)


def _yaw(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def revisit_keyframes(seed: int, loops: int = 3, spacing_m: float = 0.15, width: int = 128, height: int = 96
                      ) -> Keyframes:
    """Keyframes along ``loops`` passes of scene ``seed``'s loop, later passes changed (module docstring)."""
    scene = SyntheticScene(seed)
    cam = make_camera_model(width, height)
    period = scene.trajectory.loop_length_m / scene.trajectory.speed_mps
    rng = np.random.default_rng(seed)
    images, poses, passes = [], [], []
    for t in np.arange(0.0, loops * period, spacing_m / scene.trajectory.speed_mps):
        k = int(t // period)
        side, yaw, gain = PASS_CHANGES[k % len(PASS_CHANGES)]
        T_wc = scene.base_pose(float(t)) @ make_pose(_yaw(yaw), [0.0, side, 0.0]) @ scene.T_base_camera
        rgb, _ = scene.render(T_wc, cam)
        rgb = rgb.astype(np.float32) * gain + rng.normal(scale=NOISE_SIGMA, size=rgb.shape)
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
        poses.append(T_wc)
        passes.append(k)
    return Keyframes(images, np.stack(poses), np.asarray(passes))


def true_revisits(T: np.ndarray) -> np.ndarray:
    """(n, n) bool: camera i and camera j within REVISIT_M and REVISIT_DEG."""
    c = T[:, :3, 3]
    close = np.linalg.norm(c[:, None] - c[None], axis=2) <= REVISIT_M
    # The angle between two orientations, through the trace of R_i^T R_j.
    trace = np.einsum("iab,jab->ij", T[:, :3, :3], T[:, :3, :3])
    angle = np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
    return close & (angle <= REVISIT_DEG)


def score_descriptor(kf: Keyframes, kind: str, gap: int, min_similarity: float) -> dict:
    """Recall at top-1 / top-3 of the later passes, precision and acceptance at ``min_similarity``."""
    t0 = time.perf_counter()
    D = np.stack([describe(image, kind) for image in kf.images])
    describe_s = (time.perf_counter() - t0) / len(kf.images)
    S = similarities(D, D)  # as KeyframeMemory.similar: centred on the stored mean
    truth = true_revisits(kf.T_world_camera)
    n = len(D)
    hits1 = hits3 = queries = accepted = accepted_true = 0
    true_sims, false_sims = [], []
    for b in range(gap + 1, n):
        older = np.arange(b - gap)  # as LoopCloser.propose: at least ``gap`` keyframes older
        order = older[np.argsort(-S[b, older], kind="stable")]
        top = order[:3]
        if kf.passes[b] > 0 and truth[b, older].any():
            queries += 1
            hits1 += bool(truth[b, top[0]])
            hits3 += bool(truth[b, top].any())
        (true_sims if truth[b, top[0]] else false_sims).append(float(S[b, top[0]]))
        if S[b, top[0]] >= min_similarity:
            accepted += 1
            accepted_true += bool(truth[b, top[0]])
    return {"descriptor": kind, "dims": int(D.shape[1]), "queries": queries,
            "recall_top1": hits1 / max(queries, 1), "recall_top3": hits3 / max(queries, 1),
            "accepted": accepted, "accepted_true": accepted_true, "precision": accepted_true / max(accepted, 1),
            "keyframes": n - gap - 1, "describe_small_s": describe_s,
            "top1_similarity_true": float(np.median(true_sims)) if true_sims else math.nan,
            "top1_similarity_false": float(np.median(false_sims)) if false_sims else math.nan,
            "similarity_p5_p95": [float(x) for x in np.percentile(S[np.triu_indices(n, 1)], [5, 95])]}


def time_describe(kind: str, image: np.ndarray, width: int, repeats: int = 30) -> float:
    """Median seconds to describe ``image`` resized to ``width`` (the size the memory stores)."""
    h = round(image.shape[0] * width / image.shape[1])
    big = np.array(Image.fromarray(image).resize((width, h), Image.BILINEAR))
    describe(big, kind)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        describe(big, kind)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_search(kind: str, stored: int = 2000, queries: int = 60) -> dict:
    """Median seconds of KeyframeMemory.similar and LoopCloser.propose with ``stored`` keyframes."""
    scene = SyntheticScene(0)
    cam = make_camera_model(64, 48)
    image = scene.render(scene.camera_pose(1.0), cam)[0]
    depth = torch.full((48, 64), 3.0)
    valid = torch.ones(48, 64, dtype=torch.bool)
    dims = describe(image, kind).shape[0]
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(stored + queries, dims)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    config = LoopConfig(descriptor=kind, every_keyframes=1)  # every call does the work
    closer = LoopCloser(config, 0.05, math.radians(1.0))
    poses: dict[int, np.ndarray] = {}
    spacing_s = 0.15 / scene.trajectory.speed_mps

    def remember(kid: int) -> None:
        t = kid * spacing_s
        frame = Frame(image, int(t * 1e9), "camera", "camera_optical_frame", cam)
        closer.remember(kid, frame.stamp_ns, [(frame, scene.T_base_camera, depth, valid)], desc[kid:kid + 1])
        poses[kid] = scene.base_pose(t)

    for kid in range(stored):
        remember(kid)
    similar, propose = [], []
    for kid in range(stored, stored + queries):
        remember(kid)
        t0 = time.perf_counter()
        closer.memory.similar(desc[kid:kid + 1], kid - config.min_gap_keyframes, config.appearance_candidates)
        t1 = time.perf_counter()
        closer.propose(kid, poses, 0.5)
        t2 = time.perf_counter()
        similar.append(t1 - t0)
        propose.append(t2 - t1)
    return {"stored": stored, "similar_s": float(np.median(similar)), "propose_s": float(np.median(propose)),
            "memory_mb": closer.memory.nbytes / 1e6}


def bench_loops(seeds: tuple[int, ...] = (0, 1), loops: int = 3, width: int = 128, height: int = 96) -> dict:
    config = LoopConfig()
    kfs = [revisit_keyframes(seed, loops, width=width, height=height) for seed in seeds]
    results: dict = {"seeds": list(seeds), "loops": loops, "size": f"{width}x{height}",
                     "min_similarity": config.min_similarity, "gap": config.min_gap_keyframes,
                     "default": config.descriptor, "descriptors": {}}
    for kind in DESCRIPTORS:
        per_scene = [score_descriptor(kf, kind, config.min_gap_keyframes, config.min_similarity) for kf in kfs]
        total = {key: sum(s[key] for s in per_scene) for key in ("queries", "accepted", "accepted_true", "keyframes")}
        q = max(total["queries"], 1)
        results["descriptors"][kind] = {
            **total, "dims": per_scene[0]["dims"],
            "recall_top1": sum(s["recall_top1"] * s["queries"] for s in per_scene) / q,
            "recall_top3": sum(s["recall_top3"] * s["queries"] for s in per_scene) / q,
            "precision": total["accepted_true"] / max(total["accepted"], 1),
            "top1_similarity_true": float(np.nanmedian([s["top1_similarity_true"] for s in per_scene])),
            "top1_similarity_false": float(np.nanmedian([s["top1_similarity_false"] for s in per_scene])),
            "similarity_p5_p95": [min(s["similarity_p5_p95"][0] for s in per_scene),
                                  max(s["similarity_p5_p95"][1] for s in per_scene)],
            "describe_small_s": float(np.median([s["describe_small_s"] for s in per_scene])),
            "describe_stored_s": time_describe(kind, kfs[0].images[0], config.image_width),
            "search": time_search(kind),
        }
    d = results["descriptors"]
    # Recall at top-1 decides (a revisit missed is a loop not closed), then precision at the threshold.
    results["winner"] = max(d, key=lambda k: (round(d[k]["recall_top1"], 2), round(d[k]["precision"], 2)))
    return results


def markdown(r: dict) -> list[str]:
    d = r["descriptors"]
    stored = next(iter(d.values()))["search"]["stored"]
    lines = [
        "## Loop closure: global descriptors on synthetic revisits",
        "",
        f"Keyframes every 15 cm along {r['loops']} loops of scenes {', '.join(map(str, r['seeds']))} ({r['size']}); "
        "each later pass 25 cm to the side, turned 8 deg, at another exposure (x0.75, x1.25) with noise.",
        f"For each keyframe the stored ones at least {r['gap']} keyframes older are ranked by descriptor "
        f"similarity (as `LoopCloser.propose`). Recall: later-pass keyframes whose top-1 (top-3) is a true "
        f"revisit (camera within {REVISIT_M:g} m and {REVISIT_DEG:g} deg). Precision: top-1 candidates at or above "
        f"`min_similarity` {r['min_similarity']} that are true, over every keyframe of every pass. Cosine: of the "
        "top-1 when true / false (medians), and of all keyframe pairs (5th-95th percentile). Describe: one image at "
        f"the stored width ({LoopConfig().image_width} px). Search: at {stored} stored keyframes, per call "
        f"(`propose` runs every `every_keyframes` = {LoopConfig().every_keyframes} keyframes).",
        "",
        "| descriptor | dims | recall top-1 | recall top-3 | accepted (true) | precision | cosine top-1 true / false |"
        " cosine all pairs | describe | `similar` | `propose` |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, x in d.items():
        lines.append(
            f"| {kind} | {x['dims']} | {x['recall_top1'] * 100:.0f} % of {x['queries']} | "
            f"{x['recall_top3'] * 100:.0f} % | {x['accepted']} ({x['accepted_true']}) of {x['keyframes']} | "
            f"{x['precision'] * 100:.0f} % | {x['top1_similarity_true']:.3f} / {x['top1_similarity_false']:.3f} | "
            f"{x['similarity_p5_p95'][0]:.2f} to {x['similarity_p5_p95'][1]:.2f} | "
            f"{x['describe_stored_s'] * 1e3:.2f} ms | {x['search']['similar_s'] * 1e3:.2f} ms | "
            f"{x['search']['propose_s'] * 1e3:.2f} ms |")
    win = r["winner"]
    lines += ["", f"Winner: `{win}` (recall at top-1, then precision); `LoopConfig.descriptor` default: "
              f"`{r['default']}`."]
    for kind, x in d.items():
        if x["similarity_p5_p95"][0] >= r["min_similarity"]:
            lines.append(f"`min_similarity` {r['min_similarity']} filters nothing for `{kind}`: 95 % of all pairs of "
                         f"images are above it, so every searched keyframe proposes its top-1 for verification.")
        elif x["accepted"] < 0.05 * x["keyframes"]:
            lines.append(f"`min_similarity` {r['min_similarity']} lets almost nothing of `{kind}` through "
                         f"({x['accepted']} of {x['keyframes']} keyframes).")
    return lines + [""]


def bench_loop_descriptors() -> list[str]:
    """Markdown lines for docs/benchmarks.md."""
    return markdown(bench_loops())


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("\n".join(bench_loop_descriptors()))
