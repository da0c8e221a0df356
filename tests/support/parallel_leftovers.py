"""pytest plugin (`-p tests.support.parallel_leftovers`): after the teardown of each test
module's last test (its module fixtures included), a module that left torch.distributed's
process group or Megatron's model-parallel groups initialised gets a teardown error naming
what it left, and the state is torn down so the next module is judged on its own. Later
modules would otherwise run on that state (and its store's port)."""
import sys

import pytest


def left_behind() -> list[str]:
    dist = sys.modules.get("torch.distributed")
    state = sys.modules.get("megatron.core.parallel_state")
    return [name for name, up in (
        ("torch.distributed's process group", dist is not None and dist.is_initialized()),
        ("Megatron's model-parallel groups",
         state is not None and state.model_parallel_is_initialized())) if up]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if nextitem is None or nextitem.module is not item.module:
        left = left_behind()
        if left:
            from masa_megatron.parallel import destroy_parallel

            destroy_parallel()      # masa's own teardown (its module state too), then a group
            if sys.modules["torch.distributed"].is_initialized():   # it did not create
                sys.modules["torch.distributed"].destroy_process_group()
            raise AssertionError(f"{item.module.__name__} left {' and '.join(left)} "
                                 f"initialised after its tests")
    return result
