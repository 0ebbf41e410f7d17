"""Meta-World task suites and the environment factory (gymnasium + metaworld only)."""

from envs.factory import make_env, make_vec_env
from envs.pool import EnvPool, default_pool
from envs.suites import CW10, CW20, MT40, MT50, SUITES, resolve_task, resolve_tasks
from envs.wrappers import MetaWorldWrapper, final_step_infos

__all__ = [
    "CW10",
    "CW20",
    "EnvPool",
    "MT40",
    "MT50",
    "SUITES",
    "MetaWorldWrapper",
    "final_step_infos",
    "make_env",
    "make_vec_env",
    "default_pool",
    "resolve_task",
    "resolve_tasks",
]
