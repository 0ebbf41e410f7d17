"""Meta-World task suites and the environment factory (gymnasium + metaworld only)."""

from envs.factory import make_env, make_vec_env
from envs.suites import CW10, CW20, MT40, MT50, SUITES, resolve_task, resolve_tasks
from envs.wrappers import MetaWorldWrapper, final_step_infos

__all__ = [
    "CW10",
    "CW20",
    "MT40",
    "MT50",
    "SUITES",
    "MetaWorldWrapper",
    "final_step_infos",
    "make_env",
    "make_vec_env",
    "resolve_task",
    "resolve_tasks",
]
