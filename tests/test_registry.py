"""Generic registry and the reward registry (built-ins, out-of-tree rewards by import path)."""
import pytest

from masa_megatron.registry import Registry, RegistryError, import_object
from masa_megatron.rewards.math import grade
from masa_megatron.rewards.meta import meta_reward
from masa_megatron.rewards.registry import get_batch_reward, get_reward, register_reward


def contains_answer(response: str, reference: str, **_) -> float:
    """An out-of-tree reward: 1 if the reference appears verbatim in the response."""
    return 1.0 if reference in response else 0.0


class Holder:
    @staticmethod
    def reward(response, reference, **_):
        return 0.5


def test_builtin_rewards():
    assert get_reward("math") is grade
    assert get_reward("meta") is meta_reward


@pytest.mark.parametrize("path", [f"{__name__}:contains_answer", f"{__name__}.contains_answer"])
def test_out_of_tree_reward_by_dotted_path(path):
    reward = get_reward(path)
    assert reward is contains_answer
    assert reward("the answer is 42", "42") == 1.0
    assert get_batch_reward(path)(["42", "41"], ["42", "42"]) == [1.0, 0.0]


def test_nested_attribute_paths():
    assert get_reward(f"{__name__}:Holder.reward")("a", "b") == 0.5
    assert get_reward(f"{__name__}.Holder.reward")("a", "b") == 0.5


def test_builtin_math_reward_is_batched():
    assert get_batch_reward("math") is grade.batch


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(RegistryError) as info:
        get_reward("no_such_reward")
    message = str(info.value)
    assert "'no_such_reward'" in message and "math" in message and "meta" in message
    with pytest.raises(RegistryError, match="did you mean 'math'"):
        get_reward("maths")
    with pytest.raises(LookupError, match="math, meta"):
        get_reward("no_such_module_xyz.reward")
    with pytest.raises(RegistryError, match="has no attribute"):
        get_reward(f"{__name__}:missing_function")


def test_register_decorator_and_duplicates():
    registry = Registry("widget")

    @registry.register("double")
    def double(x):
        return 2 * x

    @registry.register
    def triple(x):
        return 3 * x

    assert registry.get("double")(2) == 4 and registry.get("triple")(2) == 6
    assert registry.names() == ["double", "triple"] and "double" in registry and len(registry) == 2
    registry.register("double", double)  # same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.register("double", triple)
    registry.register("double", triple, override=True)
    assert registry.get("double") is triple
    with pytest.raises(RegistryError, match="Registered widget names: double, triple"):
        registry.get("quadruple")


def test_register_reward_then_get():
    @register_reward("test_registry_always_one", override=True)
    def always_one(response, reference, **_):
        return 1.0

    assert get_reward("test_registry_always_one") is always_one
    assert get_batch_reward("test_registry_always_one")(["a", "b"], ["c", "d"]) == [1.0, 1.0]


def test_import_object_errors_of_user_modules_propagate(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_module.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency_xyz"):
        import_object("broken_reward_module:fn")
    with pytest.raises(RegistryError):
        import_object(".relative:fn")
    with pytest.raises(RegistryError):
        import_object("")


def test_non_callable_reward_is_rejected():
    with pytest.raises(TypeError):
        get_reward(f"{__name__}:__doc__")
