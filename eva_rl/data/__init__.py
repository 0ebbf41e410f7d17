"""Trajectory datasets on disk, the npz importer and the window sampler (numpy only)."""

from eva_rl.data.format import (
    FORMAT_VERSION,
    DatasetError,
    TrajectoryDataset,
    is_complete_dataset,
    open_dataset,
    open_datasets,
    remove_temp_dirs,
    temp_dirs,
    write_dataset,
)
from eva_rl.data.importers import episode_offsets_from_dones, import_npz
from eva_rl.data.sampler import WindowSampler, compute_state_stats

__all__ = [
    "FORMAT_VERSION",
    "DatasetError",
    "TrajectoryDataset",
    "WindowSampler",
    "compute_state_stats",
    "episode_offsets_from_dones",
    "import_npz",
    "is_complete_dataset",
    "open_dataset",
    "open_datasets",
    "remove_temp_dirs",
    "temp_dirs",
    "write_dataset",
]
