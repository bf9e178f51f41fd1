"""How stages get Ray: inside a running cluster they join it and start nothing of their own."""
import os

from engine.ray_local import LOCAL_TRAIN_POLL_S, ensure_ray, joins_cluster, local_train_env


def test_a_running_cluster_is_joined_not_replaced(ray_session):
    before = ray_session.get_runtime_context().get_node_id()
    assert joins_cluster()
    assert ensure_ray(min_cpus=10_000) is False          # no local instance started, whatever it asks for
    assert ray_session.get_runtime_context().get_node_id() == before


def test_local_train_poll_keeps_a_users_value(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    local_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    local_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == LOCAL_TRAIN_POLL_S
