"""The occupancy grid: what is occupied, free and unknown, the floor, corrections of any age, the budget, inputs.

Views are rendered analytically from a few planes and boxes (floor z = 0, a wall, a ceiling), so
every expected cell is known exactly; two cameras (front and left) where it applies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mapany_ros.core.geometry import make_pose
from mapany_ros.core.occupancy import FREE, OCCUPIED, UNKNOWN, GridSnapshot, OccupancyConfig, OccupancyGrid
from mapany_ros.core.occupancy.grid import MAX_CELLS
from mapany_ros.sim.scene import make_camera_model, make_T_base_camera

W, H = 160, 120
CAMERA = make_camera_model(W, H, hfov_deg=70.0)
#: Two cameras on the robot: one looking forward, one looking left (both 0.5 m up, pitched 5 deg down).
FRONT = make_T_base_camera(0.3, 0.5, 5.0)
LEFT = make_pose(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), [0.0, 0.2, 0.0]) @ FRONT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base(x: float, y: float = 0.0, yaw_deg: float = 0.0, z: float = 0.0) -> np.ndarray:
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    return make_pose(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), [x, y, z])


def render(T_world_camera: np.ndarray, *, wall_x: float = 3.02, ceiling: float = 2.6, floor: float = 0.0,
           boxes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = ()) -> np.ndarray:
    """Exact z-depth (H, W) of a world made of a floor, a wall x = wall_x, a ceiling and axis-aligned boxes
    (min corner, max corner); NaN where a ray meets none of them."""
    ij = np.stack(np.meshgrid(np.arange(W), np.arange(H)), -1).reshape(-1, 2).astype(np.float64)
    rays = np.concatenate([ij, np.ones((len(ij), 1))], 1) @ np.linalg.inv(CAMERA.K).T  # camera z = 1
    d = rays @ T_world_camera[:3, :3].T
    o = T_world_camera[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = [np.where(d[:, 2] < 0, (floor - o[2]) / d[:, 2], np.inf),
              np.where(d[:, 2] > 0, (ceiling - o[2]) / d[:, 2], np.inf),
              np.where(d[:, 0] > 0, (wall_x - o[0]) / d[:, 0], np.inf)]
        for lo, hi in boxes:
            t1, t2 = (np.asarray(lo) - o) / d, (np.asarray(hi) - o) / d
            near, far = np.nanmax(np.minimum(t1, t2), 1), np.nanmin(np.maximum(t1, t2), 1)
            ts.append(np.where((near <= far) & (near > 0), near, np.inf))
    t = np.min(np.stack(ts), 0)
    return np.where(np.isfinite(t), t, np.nan).reshape(H, W).astype(np.float32)


def drive(grid: OccupancyGrid, poses: list[np.ndarray], cameras=(("front", FRONT), ("left", LEFT)), first: int = 0,
          placed: list[np.ndarray] | None = None, **world) -> None:
    """Each camera's view from each base pose; ``placed``: the base poses the keyframes are integrated at
    (a placement error), default the true ones."""
    for i, T_world_base in enumerate(poses):
        for name, T_base_camera in cameras:
            T = T_world_base @ T_base_camera
            T_placed = T if placed is None else placed[i] @ T_base_camera
            grid.integrate((name, first + i), render(T, **world), CAMERA.K, T_placed, T_base_camera=T_base_camera)


def value_at(snap: GridSnapshot, x: float, y: float) -> int:
    r, c = snap.cell_of(x, y)
    if not (0 <= r < snap.height and 0 <= c < snap.width):
        return UNKNOWN
    return int(snap.data[r, c])


def values(snap: GridSnapshot, xs: np.ndarray, y: float) -> np.ndarray:
    return np.array([value_at(snap, float(x), y) for x in xs])


def assert_same(a: GridSnapshot, b: GridSnapshot) -> None:
    assert a.data.size > 0
    assert a.origin_xy == pytest.approx(b.origin_xy) and a.data.shape == b.data.shape
    np.testing.assert_array_equal(a.data, b.data)


ROW = [base(x) for x in (0.0, 0.1, 0.2, 0.3)]


# ------------------------------------------------------------------------------ occupied, free, unknown


def test_wall_is_occupied_floor_before_it_free_behind_it_unknown_with_two_cameras() -> None:
    grid = OccupancyGrid()
    drive(grid, ROW)
    snap = grid.snapshot()
    assert snap.resolution == 0.05
    # The wall x = 3.02 lies in the cells [3.00, 3.05): occupied across the front camera's view.
    assert all(value_at(snap, 3.02, y) == OCCUPIED for y in np.arange(-0.8, 0.81, 0.1) + 0.025)
    # The floor the cameras saw on the way is free, right up to the cell before the wall; no floor cell is an obstacle.
    assert np.all(values(snap, np.arange(1.2, 2.9, 0.05) + 0.025, 0.0) == FREE)
    _, cols = np.nonzero(snap.data == OCCUPIED)
    assert np.all(np.isclose(snap.origin_xy[0] + cols * 0.05, 3.0))  # every obstacle cell is on the wall
    # Behind the wall nobody saw anything; the ceiling (2.6 m) was passed under, not mapped.
    assert np.all(values(snap, [3.2, 3.5, 4.0], 0.0) == UNKNOWN)
    # The left camera saw the floor to the robot's left (the front camera does not look there).
    assert value_at(snap, 0.3, 1.5) == FREE and value_at(snap, 0.3, -1.5) == UNKNOWN


def test_heights_decide_what_is_an_obstacle() -> None:
    """A 3 cm step is floor, a 30 cm box is an obstacle, a shelf above max_height_m is passed under."""
    step = ((1.5, -1.0, 0.0), (1.7, -0.6, 0.03))
    box = ((1.5, 0.3, 0.0), (1.7, 0.6, 0.3))
    shelf = ((2.0, -0.3, 2.1), (2.4, 0.3, 2.2))
    grid = OccupancyGrid()
    drive(grid, ROW, boxes=(step, box, shelf))
    snap = grid.snapshot()
    assert value_at(snap, 1.525, 0.425) == OCCUPIED  # the box's front face
    assert value_at(snap, 1.625, -0.775) == FREE  # on top of the step: seen, below min_height_m
    assert value_at(snap, 2.225, 0.025) == FREE  # under the shelf
    assert not np.any(values(snap, np.arange(1.3, 2.9, 0.05) + 0.025, -0.775) == OCCUPIED)
    # Behind the box (from the cameras) is unknown: the box hides it.
    assert value_at(snap, 1.875, 0.425) == UNKNOWN


def test_the_floor_is_under_each_keyframe_base() -> None:
    """The world and the robot 0.4 m higher (odometry with a z offset, or vertical drift) give the same grid;
    base_height_m moves the floor below base_frame."""
    box = ((1.5, 0.3, 0.0), (1.7, 0.6, 0.3))
    flat = OccupancyGrid()
    drive(flat, ROW, boxes=(box,))
    lifted = OccupancyGrid()
    up = ((1.5, 0.3, 0.4), (1.7, 0.6, 0.7))
    drive(lifted, [base(x, z=0.4) for x in (0.0, 0.1, 0.2, 0.3)], floor=0.4, ceiling=3.0, boxes=(up,))
    assert_same(lifted.snapshot(), flat.snapshot())
    # base_frame 0.4 m above the floor (the robot's base_link, not its footprint): the same again.
    raised = OccupancyGrid(OccupancyConfig(base_height_m=0.4))
    lifted_base = make_pose(np.eye(3), [0.0, 0.0, -0.4])  # base_link 0.4 m up: the camera is 0.1 m above it
    drive(raised, [base(x, z=0.4) for x in (0.0, 0.1, 0.2, 0.3)], boxes=(box,),
          cameras=(("front", lifted_base @ FRONT), ("left", lifted_base @ LEFT)))
    assert_same(raised.snapshot(), flat.snapshot())


def test_a_surface_one_keyframe_put_behind_the_wall_is_outvoted() -> None:
    """A keyframe whose depth is 5 % long (a badly scaled window) puts the wall 13 cm too far: the other
    keyframes, which saw the wall in front of those cells, outvote it, and it does not erase the wall."""
    grid = OccupancyGrid()
    drive(grid, ROW)
    T = base(0.15) @ FRONT
    grid.integrate(("front", 99), render(T) * 1.05, CAMERA.K, T, T_base_camera=FRONT)
    snap = grid.snapshot()
    assert value_at(snap, 3.02, 0.0) == OCCUPIED
    assert value_at(snap, 3.12, 0.0) != OCCUPIED
    alone = OccupancyGrid()  # without the others, that keyframe's wall stands where it put it
    alone.integrate(("front", 99), render(T) * 1.05, CAMERA.K, T, T_base_camera=FRONT)
    assert value_at(alone.snapshot(), 3.12, 0.0) == OCCUPIED


def test_a_keyframe_tilted_by_a_pose_error_still_sees_the_floor_as_floor() -> None:
    """A keyframe placed 1.5 deg pitched (a pose-graph error) lifts the far floor by 8 cm, above
    min_height_m: heights are measured from the floor plane it saw, so no floor cell becomes an obstacle."""
    T_true = ROW[0] @ FRONT
    pitch = make_pose(np.array([[1.0, 0.0, 0.0], [0.0, math.cos(0.026), -math.sin(0.026)],
                                [0.0, math.sin(0.026), math.cos(0.026)]]), [0.0, 0.0, 0.0])
    grid = OccupancyGrid()
    grid.integrate(("front", 0), render(T_true), CAMERA.K, T_true @ pitch, T_base_camera=FRONT)  # optical x: pitch
    snap = grid.snapshot()
    _, cols = np.nonzero(snap.data == OCCUPIED)
    assert cols.size > 10 and np.all(snap.origin_xy[0] + (cols + 0.5) * 0.05 > 2.9)  # the wall, nothing before it


def test_a_lone_sample_is_no_obstacle_but_a_surface_between_rays_is() -> None:
    """One stray sample in free space marks nothing; a far wall whose rays land cells apart stays whole."""
    T = ROW[0] @ FRONT
    depth = render(T)
    depth[56, 80] = 1.5  # a flier 1.5 m ahead (a pixel the stride-8 grid samples)
    grid = OccupancyGrid()
    grid.integrate(("front", 0), depth, CAMERA.K, T, T_base_camera=FRONT)
    snap = grid.snapshot()
    near = [value_at(snap, x, y) for x in np.arange(1.5, 2.1, 0.05) + 0.025 for y in (-0.075, -0.025, 0.025, 0.075)]
    assert OCCUPIED not in near
    # The wall 2.7 m ahead: rays 8 pixels apart are 19 cm apart there, yet every cell between is an obstacle.
    assert all(value_at(snap, 3.025, y) == OCCUPIED for y in np.arange(-0.6, 0.61, 0.05) + 0.025)


# ------------------------------------------------------------------------------ corrections


def test_update_pose_equals_integrating_at_the_corrected_pose_at_any_age() -> None:
    """30 keyframes; the oldest and a middle one are corrected late (a loop closure): exactly the grid of
    the corrected poses, applied once when read."""
    poses = [base(0.05 * i, 0.02 * math.sin(i)) for i in range(15)]
    truth = OccupancyGrid()
    drive(truth, poses)
    wrong = [p @ base(0.0, 0.4, 8.0) if i in (0, 7) else p for i, p in enumerate(poses)]
    grid = OccupancyGrid()
    drive(grid, poses, placed=wrong)
    assert grid.keyframes_integrated == 30
    before = grid.snapshot()
    for i in (0, 7):
        for name, T_base_camera in (("front", FRONT), ("left", LEFT)):
            assert grid.update_pose((name, i), poses[i] @ T_base_camera)
    assert grid.keyframes_reposed == 0  # recorded, not yet applied
    after = grid.snapshot()
    assert grid.keyframes_reposed == 4 and after.version > before.version
    assert_same(after, truth.snapshot())
    assert not np.array_equal(before.data, truth.snapshot().data)


def test_update_poses_takes_a_loop_closure_at_once_as_update_pose_does() -> None:
    """A batch of corrections (both cameras of every keyframe, the way a loop closure reports them, with
    unknown keys, small ones and one back where its votes are) gives the grid one update_pose each gives;
    a batch with one bad pose changes nothing."""
    poses = [base(0.05 * i, 0.02 * math.sin(i)) for i in range(12)]
    wrong = [p @ base(0.0, 0.05 * i, 1.5 * i) for i, p in enumerate(poses)]
    one_by_one, batch, truth = OccupancyGrid(), OccupancyGrid(), OccupancyGrid()
    for g in (one_by_one, batch):
        drive(g, poses, placed=wrong)
    drive(truth, poses)
    corrections = {(name, i): poses[i] @ T_base_camera for i in range(12) for name, T_base_camera in
                   (("front", FRONT), ("left", LEFT))}
    corrections[("front", 0)] = wrong[0] @ FRONT @ base(0.004)  # under a quarter cell: waits
    corrections[("rear", 3)] = poses[3]  # no such keyframe
    assert batch.update_pose(("left", 1), wrong[1] @ LEFT @ base(0.5))  # pending, then back where its votes are
    corrections[("left", 1)] = wrong[1] @ LEFT
    expected = sum(one_by_one.update_pose(k, T) for k, T in corrections.items())
    bad = dict(corrections)
    bad[("left", 5)] = np.full((4, 4), np.nan)
    version = batch.version
    with pytest.raises(ValueError, match="rigid"):
        batch.update_poses(bad)
    assert batch.version == version and len(batch._pending) == 1
    assert batch.update_poses(corrections) == expected == 21 and batch.version > version
    assert not batch._pending.keys() - one_by_one._pending.keys()
    assert_same(batch.snapshot(), one_by_one.snapshot())
    assert batch.keyframes_reposed == one_by_one.keyframes_reposed == 21
    assert disagreement(batch.snapshot(), truth.snapshot()) < 0.01
    far = {("front", 2): base(1e4) @ FRONT}
    with pytest.raises(ValueError, match="would grow the occupancy grid"):
        batch.update_poses(far)
    assert batch.update_poses({}) == 0


def test_small_corrections_wait_and_a_correction_back_cancels() -> None:
    grid = OccupancyGrid()
    drive(grid, ROW)
    snap = grid.snapshot()
    T = ROW[1] @ FRONT
    assert not grid.update_pose(("front", 1), T @ base(0.005))  # a few millimetres: nothing to redo
    assert grid.update_pose(("front", 1), T @ base(0.3))
    assert not grid.update_pose(("front", 1), T)  # back where its votes are: the pending move is dropped
    assert_same(grid.snapshot(), snap)
    assert grid.keyframes_reposed == 0
    assert not grid.update_pose(("front", 42), T)  # unknown keyframe


def test_keyframes_beyond_the_budget_are_frozen_where_they_were_last_put() -> None:
    grid = OccupancyGrid(OccupancyConfig(keep_keyframes=3))
    drive(grid, ROW[:1])  # keyframes 0 of both cameras
    T = ROW[0] @ base(0.0, 0.5) @ FRONT
    assert grid.update_pose(("front", 0), T)  # pending when it is frozen: applied first
    drive(grid, ROW[1:3], cameras=(("front", FRONT),), first=1)
    assert grid.num_movable_keyframes == 3 and not grid.update_pose(("front", 0), ROW[0] @ FRONT)
    reference = OccupancyGrid()
    reference.integrate(("front", 0), render(ROW[0] @ FRONT), CAMERA.K, T, T_base_camera=FRONT)
    drive(reference, ROW[:1], cameras=(("left", LEFT),))
    drive(reference, ROW[1:3], cameras=(("front", FRONT),), first=1)
    assert_same(grid.snapshot(), reference.snapshot())
    assert grid.keyframe_bytes == 3 * (H // 8) * (W // 8) * 2  # float16 depth on the stride grid


def test_reset_forgets_everything_and_changes_the_version() -> None:
    grid = OccupancyGrid()
    drive(grid, ROW[:2])
    version = grid.snapshot().version
    grid.reset()
    snap = grid.snapshot()
    assert snap.data.shape == (0, 0) and snap.version > version
    assert grid.num_movable_keyframes == 0 and not grid.update_pose(("front", 0), ROW[0] @ FRONT)
    drive(grid, ROW[:2])  # the same keys are welcome again
    assert np.any(grid.snapshot().data == OCCUPIED)


# ------------------------------------------------------------------------------ inputs


def test_confidence_valid_and_range_drop_samples() -> None:
    T = ROW[0] @ FRONT
    depth = render(T)
    far = OccupancyGrid(OccupancyConfig(max_range_m=2.5))  # the wall (about 2.7 m) is out of range
    far.integrate(("front", 0), depth, CAMERA.K, T, T_base_camera=FRONT)
    assert not np.any(far.snapshot().data == OCCUPIED)
    invalid = OccupancyGrid()
    invalid.integrate(("front", 0), depth, CAMERA.K, T, valid=np.zeros((H, W), bool), T_base_camera=FRONT)
    assert invalid.snapshot().data.size == 0
    confidence = np.ones((H, W), np.float32)
    confidence[:, 2 * W // 3:] = 0.01  # the right third (the -y side) is not trusted
    half = OccupancyGrid()
    half.integrate(("front", 0), depth, CAMERA.K, T, confidence, T_base_camera=FRONT)
    snap = half.snapshot()
    assert value_at(snap, 3.02, 0.525) == OCCUPIED and value_at(snap, 3.02, -0.825) == UNKNOWN


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depth": np.zeros((H, W), np.int32)}, "floating-point"),
    ({"K": np.eye(3) * 0}, "K must be"),
    ({"T_map_camera": np.ones((4, 4))}, "T_map_camera must be"),
    ({"valid": np.ones((H, W + 1), bool)}, "valid must have shape"),
    ({"confidence": np.ones((H, W), np.int64)}, "confidence must be of dtype"),
    ({"T_base_camera": np.zeros((4, 4))}, "T_base_camera must be"),
])
def test_bad_input_is_a_clear_value_error(kwargs: dict, message: str) -> None:
    T = ROW[0] @ FRONT
    args = {"depth": render(T), "K": CAMERA.K, "T_map_camera": T, **kwargs}
    grid = OccupancyGrid()
    with pytest.raises(ValueError, match=message):
        grid.integrate(("front", 0), **args)
    assert grid.snapshot().data.size == 0


def test_duplicate_keys_and_poses_far_off_are_refused() -> None:
    grid = OccupancyGrid()
    drive(grid, ROW[:1])
    T = ROW[0] @ FRONT
    with pytest.raises(ValueError, match="already in the grid"):
        grid.integrate(("front", 0), render(T), CAMERA.K, T)
    far = base(1.0e6) @ FRONT
    with pytest.raises(ValueError, match=f"more than {MAX_CELLS} cells"):
        grid.integrate(("front", 1), render(T), CAMERA.K, far)
    with pytest.raises(ValueError, match="more than"):
        grid.update_pose(("front", 0), far)
    assert grid.num_movable_keyframes == 2


@pytest.mark.parametrize(("field", "value"), [("resolution_m", 0.0), ("pixel_stride", 2.5), ("max_range_m", -1.0),
                                               ("keep_keyframes", -1), ("min_height_m", 3.0)])
def test_config_rejects_values_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"OccupancyConfig.{field}"):
        OccupancyConfig(**{field: value})


# ------------------------------------------------------------------------------ targets on the demo's path


def check_targets(run, seed: int) -> dict[str, float]:
    from mapany_ros.scoring.occupancy import TARGETS

    scores = run.scores()
    grid = run.pipeline.grid
    assert grid.keyframes_integrated == len(run.views) >= 30
    for name, target in TARGETS.items():
        assert scores[name] >= target, f"seed {seed}: {name} {scores[name]:.3f} < {target} ({scores})"
    assert scores["cells_seen_occupied"] > 150 and scores["cells_free"] > 3000  # a real room, not a corner
    return scores


@pytest.mark.parametrize("seed", [0])
def test_demo_path_with_the_demo_backend_meets_the_targets(seed: int) -> None:
    """The demo's path: 320x240, 8 s from 4 s into the loop, config/demo.yaml (plane sweep on rendered
    images, exact odometry), default grid parameters, on the demo scene (seed 0); `make bench` scores
    seven seeds (docs/benchmarks.md)."""
    from mapany_ros.bench.occupancy import demo_path_run

    check_targets(demo_path_run(seed, "planesweep"), seed)


def disagreement(a: GridSnapshot, b: GridSnapshot) -> float:
    """Fraction of the cells either grid knows on which they differ."""
    res = a.resolution
    (ax, ay), (bx, by) = ((round(g.origin_xy[0] / res), round(g.origin_xy[1] / res)) for g in (a, b))
    x0, y0 = min(ax, bx), min(ay, by)
    shape = (max(ay + a.height, by + b.height) - y0, max(ax + a.width, bx + b.width) - x0)
    A, B = np.full(shape, UNKNOWN, np.int8), np.full(shape, UNKNOWN, np.int8)
    A[ay - y0:ay - y0 + a.height, ax - x0:ax - x0 + a.width] = a.data
    B[by - y0:by - y0 + b.height, bx - x0:bx - x0 + b.width] = b.data
    known = (A != UNKNOWN) | (B != UNKNOWN)
    return float((A != B)[known].mean())


def test_the_pipelines_grid_follows_loop_closures(monkeypatch) -> None:
    """A model whose errors add up (3 % scale, 0.3 deg and 5 mm more with every view), no odometry, 1.3
    loops, no fused map: loop closure corrects keyframes of any age, in results of no window. The grid is
    the grid of the final poses (up to corrections under a quarter cell), not the grid of the poses
    the keyframes first had."""
    from mapany_ros.sim.drive import drive as drive_pipeline
    from mapany_ros.sim.model_simulator import ModelSimulator
    from mapany_ros.sim.scene import SyntheticScene

    batches: list[set] = []
    update_poses = OccupancyGrid.update_poses

    def recording_update_poses(self, poses):
        batches.append(set(poses))
        return update_poses(self, poses)

    monkeypatch.setattr(OccupancyGrid, "update_poses", recording_update_poses)
    scene = SyntheticScene(0)
    model = ModelSimulator(scene=scene, noise_seed=4, metric=True, scale_bias=0.03, drift_deg_per_view=0.3,
                           drift_m_per_view=0.005)
    run = drive_pipeline(scene, model, loops=1.3, width=W, height=H, fusion=None)  # the grid alone
    loops = [r for r in run.results if not r.frames and r.placement.view_corrections]
    assert run.pipeline.stats.loops_closed >= 1 and loops
    # Every loop closure's corrections, hundreds of keyframes back, reached the grid in one call.
    for r in loops:
        assert set(r.placement.view_corrections) in batches
    grid = run.pipeline.grid
    snap = grid.snapshot()
    assert grid.keyframes_integrated == len(run.stamps) and grid.keyframes_reposed > 0
    final, first = OccupancyGrid(), OccupancyGrid()
    for r in run.results:
        for f, v, out in zip(r.frames, r.prediction.views, r.output_mask, strict=True):
            if out:
                T_final = run.base_poses[f.stamp_ns] @ scene.T_base_camera
                final.integrate(f.key, v.depth, v.K, T_final, v.confidence, v.valid, T_base_camera=scene.T_base_camera)
                first.integrate(f.key, v.depth, v.K, v.T_world_camera, v.confidence, v.valid,
                                T_base_camera=scene.T_base_camera)
    to_final, to_first = disagreement(snap, final.snapshot()), disagreement(snap, first.snapshot())
    assert to_final < 0.01 and to_first > 5 * to_final, (to_final, to_first)


def test_localisation_only_leaves_the_grid_alone() -> None:
    """map.update false: new keyframes are placed and published, neither the fused map nor the grid changes."""
    from mapany_ros.sim.drive import drive as drive_pipeline
    from mapany_ros.sim.model_simulator import ModelSimulator
    from mapany_ros.sim.scene import SyntheticScene

    scene = SyntheticScene(0)
    run = drive_pipeline(scene, ModelSimulator(scene=scene, noise_seed=4), loops=0.3, width=W, height=H,
                         update_map=False)
    assert len(run.stamps) >= 8
    assert run.pipeline.grid.keyframes_integrated == 0 and run.pipeline.map.keyframes_integrated == 0
    assert run.pipeline.grid.snapshot().data.size == 0
