"""Network configuration and state: YAML/env loading, validation messages, genesis persistence."""

import os

import pytest
from pydantic import ValidationError

from deploy.config import NetworkConfig
from deploy.network import prepare_state, resolve_model_source

OP = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def test_defaults_are_two_nodes_on_two_accelerators():
    cfg = NetworkConfig()
    assert {n.accelerator_type for n in cfg.nodes} == {"H100", "L4"} and cfg.host == "127.0.0.1"


def test_yaml_overrides_and_env(tmp_path, monkeypatch):
    f = tmp_path / "net.yaml"
    f.write_text(f"port: 9001\nnodes:\n  - {{node_id: x1, operator: '{OP}', accelerator_type: A100}}\n")
    monkeypatch.setenv("MERITNET_EPOCH_LENGTH_S", "30")
    cfg = NetworkConfig.load(f)
    assert cfg.port == 9001 and [n.node_id for n in cfg.nodes] == ["x1"] and cfg.epoch_length_s == 30


def test_duplicate_node_ids_are_refused_with_a_fix():
    node = {"node_id": "a", "operator": OP, "accelerator_type": "H100"}
    with pytest.raises(ValidationError, match="appears twice"):
        NetworkConfig(nodes=[node, node])


def test_bad_operator_fails_when_the_spec_is_built():
    cfg = NetworkConfig(nodes=[{"node_id": "a", "operator": OP.lower(), "accelerator_type": "H100"}])
    with pytest.raises(ValidationError, match="EIP-55"):
        cfg.nodes[0].to_spec(lambda s: "/models/x")


def test_non_builtin_sources_pass_through():
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_genesis_is_kept_across_restarts_on_a_real_chain(tmp_path):
    g1 = prepare_state(tmp_path / "s", "http://127.0.0.1:8545")
    assert prepare_state(tmp_path / "s", "http://127.0.0.1:8545") == g1


def test_embedded_chain_starts_a_fresh_state_and_keeps_the_old_aside(tmp_path):
    state = tmp_path / "s"
    prepare_state(state, "embedded")
    (state / "usage.db").write_text("old")
    prepare_state(state, "embedded")
    assert not (state / "usage.db").exists() and (tmp_path / "s.previous" / "usage.db").exists()


def test_status_table_shows_consensus_quality_or_why_there_is_none():
    from rich.console import Console

    from cluster.records import NodeStats, QualityScores
    from deploy.cli import nodes_table

    op = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    stats = [
        NodeStats(
            node_id=n,
            model_id="default",
            operator=op,
            accelerator_type="H100",
            capacity=8,
            live=True,
            running_replicas=1,
            joined_at=0.0,
        )
        for n in ("a", "b")
    ]

    def render(quality) -> str:
        console = Console(width=200, record=True)
        console.print(nodes_table(stats, quality))
        return console.export_text()

    scored = render(QualityScores(epoch=3, quality={"a": 0.0}))
    assert "0.00" in scored and "unscored" in scored  # a was caught, b not scored yet
    assert "unscored" not in render(None) and op in render(None)


def test_the_network_refuses_a_settler_key_in_the_environment(monkeypatch, tmp_path):
    """Every Ray worker (vLLM processes included) would inherit it; refused before anything starts."""
    from deploy.config import NetworkConfig
    from deploy.errors import NetworkStartError
    from deploy.network import LocalNetwork

    secret = "ab" * 32
    monkeypatch.setenv("MERITNET_SETTLER_KEY", secret)
    with pytest.raises(NetworkStartError, match="MERITNET_SETTLER_KEY_FILE") as info:
        LocalNetwork(NetworkConfig(state_dir=tmp_path)).start()
    assert secret not in str(info.value)


def test_auth_token_file_is_private_and_kept_for_the_process(monkeypatch, tmp_path):
    from cluster.local import use_auth_token

    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    first, second = tmp_path / "a" / "token", tmp_path / "b" / "token"
    use_auth_token(first)
    assert oct(first.stat().st_mode & 0o777) == "0o600" and len(first.read_text()) == 64
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(first)
    use_auth_token(second)  # a second network in the same process: Ray cached the first token
    assert second.read_text() == first.read_text() and os.environ["RAY_AUTH_TOKEN_PATH"] == str(second)


def test_cluster_yaml_passes_rays_own_schema_with_token_auth():
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on a schema error (e.g. a command parsed as a mapping)
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--autoscaling-config" in " ".join(raw["head_start_ray_commands"])


def test_cluster_yaml_offers_what_nodes_of_each_gpu_type_ask_for():
    """The autoscaler starts a worker for a pending `accel_<type>` demand only if a worker type declares
    it: every GPU type a node may name has one, with a GPU per accelerator slot."""
    from pathlib import Path

    import yaml

    from deploy.config import NodeConfig

    raw = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "cluster.yaml").read_text())
    types = raw["available_node_types"]
    for accel in ("L4", "A100", "H100"):
        spec = NodeConfig(node_id="n", operator=OP, accelerator_type=accel).to_spec(lambda s: s)
        offering = [t for t in types.values() if t["resources"].get(spec.accelerator_resource, 0) >= 1]
        assert offering, f"no worker type offers {spec.accelerator_resource}"
        assert all(t["resources"]["GPU"] == t["resources"][spec.accelerator_resource] for t in offering)
        assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in offering)  # scaled on demand
    assert raw["idle_timeout_minutes"] > 0
    setup = " ".join(raw["setup_commands"])
    assert "|| true" not in setup and "/home/ubuntu/meritnet" in setup  # the mounted checkout, failures fail
    assert raw["file_mounts"]["/home/ubuntu/meritnet"] == "."


def test_a_reachable_endpoint_without_keys_needs_an_explicit_open():
    with pytest.raises(ValidationError, match="--open"):
        NetworkConfig(host="0.0.0.0")
    assert NetworkConfig(host="0.0.0.0", open_endpoint=True).open_endpoint
    assert NetworkConfig(host="0.0.0.0", api_keys=["k"]).host == "0.0.0.0"
    assert NetworkConfig(host="127.0.0.1").host == "127.0.0.1"


def test_serve_yaml_passes_serves_schema_with_one_app_per_default_node():
    """deploy/serve.yaml is what `serve deploy` and a RayService read: Ray's own schema accepts it, its
    builders exist, and its node applications are named as the registry follows them."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    import deploy.serve_app as builders
    from cluster.records import deployment_name_for_id
    from deploy.config import NetworkConfig

    raw = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "serve.yaml").read_text())
    apps = ServeDeploySchema.model_validate(raw).applications
    for app in apps:
        module, _, name = app.import_path.partition(":")
        assert module == "deploy.serve_app" and callable(getattr(builders, name))
    nodes = {a.args["node_id"]: a.name for a in apps if a.import_path.endswith(":node")}
    assert nodes == {n.node_id: deployment_name_for_id(n.node_id) for n in NetworkConfig().nodes}
    assert all(a.route_prefix is None for a in apps if a.import_path.endswith(":node"))


def test_serve_builders_refuse_a_relative_state_dir_and_validators(tmp_path):
    import pytest

    from deploy.serve_app import _config, network

    with pytest.raises(ValueError, match="absolute path"):
        _config({"network": {"state_dir": "relative/state"}})
    cfg = {"state_dir": str(tmp_path), "validators": [{"validator_id": "v1"}]}
    with pytest.raises(ValueError, match="meritnet up"):
        network({"network": cfg})


def test_epochs_are_whole_seconds_when_settlement_runs():
    import pytest

    with pytest.raises(ValueError, match="whole number of seconds"):
        NetworkConfig(epoch_length_s=2.5)
    assert NetworkConfig(epoch_length_s=2.5, settlement=False).epoch_length_s == 2.5


def test_a_multi_gpu_engine_gets_one_bundle_per_device_on_one_node_of_its_type():
    from cluster.deployment import ACCEL_SHARE, EngineDefaults, llm_config_for
    from deploy.config import NodeConfig

    node = NodeConfig(
        node_id="big", operator=OP, accelerator_type="H100", engine_kwargs={"tensor_parallel_size": 4}
    ).to_spec(lambda s: s)
    pg = llm_config_for(node, EngineDefaults(use_gpu=True)).placement_group_config
    assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 4
    assert all(b["GPU"] == 1.0 and b["accel_H100"] == ACCEL_SHARE for b in pg["bundles"])
    assert "CPU" in pg["bundles"][0] and all("CPU" not in b for b in pg["bundles"][1:])

    cpu = llm_config_for(
        node.model_copy(update={"engine_kwargs": {}}), EngineDefaults()
    ).placement_group_config
    assert cpu["bundles"] == [{"CPU": 1.0, "accel_H100": ACCEL_SHARE}]


def test_the_start_timeout_is_configurable_and_positive():
    from deploy.config import NetworkConfig

    assert NetworkConfig.load(None).start_timeout_s == 900
    assert NetworkConfig.load(None, start_timeout_s=1800).start_timeout_s == 1800
    with pytest.raises(ValueError, match="start_timeout_s"):
        NetworkConfig.load(None, start_timeout_s=0)


def test_validators_take_the_nodes_sampler_from_the_network_yaml():
    from deploy.config import NetworkConfig

    cfg = NetworkConfig.load(None, validators=[{"validator_id": "v1", "node_sampler": "none"}])
    assert cfg.validators[0].node_sampler == "none"
    with pytest.raises(ValueError, match="node_sampler"):
        NetworkConfig.load(None, validators=[{"validator_id": "v1", "node_sampler": "gpu-maybe"}])


def _readme_network_yaml() -> list[str]:
    """The README's YAML blocks that are network configs (top-level keys all NetworkConfig fields)."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    return [
        b
        for b in blocks
        if isinstance(y := yaml.safe_load(b), dict) and set(y) <= set(NetworkConfig.model_fields)
    ]


def test_the_readmes_network_yaml_loads_and_sets_the_validators_share(tmp_path, monkeypatch):
    from deploy.usage import settlement_config

    monkeypatch.delenv("MERITNET_SETTLEMENT_VALIDATOR_SHARE_BPS", raising=False)
    blocks = _readme_network_yaml()
    assert any("validator_share_bps" in b for b in blocks)
    for block in blocks:
        f = tmp_path / "net.yaml"
        f.write_text(block)
        NetworkConfig.load(f)  # every block the README shows is a valid config
    assert settlement_config(NetworkConfig(), tmp_path / "l.db", 0.0).validator_share_bps == 2000
    cfg = NetworkConfig(validator_share_bps=4100)
    assert settlement_config(cfg, tmp_path / "l.db", 0.0).validator_share_bps == 4100
    with pytest.raises(ValidationError, match="validator_share_bps"):
        NetworkConfig(validator_share_bps=10_001)


def test_a_managed_node_may_not_run_a_model_repositorys_code_unless_the_runner_allows_it():
    """Issue 28: engines share the control plane's Ray cluster; trust_remote_code would let a model
    repository's Python reach the settlement and validator actors."""
    node = {
        "node_id": "n1",
        "operator": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "accelerator_type": "H100",
    }
    with pytest.raises(ValidationError, match="trust_remote_code"):
        NetworkConfig(nodes=[{**node, "engine_kwargs": {"trust_remote_code": True}}])
    with pytest.raises(ValidationError, match="allow_remote_model_code"):
        NetworkConfig(nodes=[node], engine={"engine_kwargs": {"trust_remote_code": True}})
    allowed = NetworkConfig(
        nodes=[{**node, "engine_kwargs": {"trust_remote_code": True}}], allow_remote_model_code=True
    )
    assert allowed.nodes[0].engine_kwargs["trust_remote_code"] is True
    assert NetworkConfig(nodes=[node]).allow_remote_model_code is False


def test_the_network_names_its_public_rpc_url_to_claimants(tmp_path):
    from deploy.usage import settlement_config

    named = NetworkConfig(public_rpc_url="https://rpc.example")
    assert settlement_config(named, tmp_path / "l.db", 0.0).public_rpc_url == "https://rpc.example"
    assert settlement_config(NetworkConfig(), tmp_path / "l.db", 0.0).public_rpc_url is None


def test_engine_defaults_are_engine_arguments_and_serving_defaults_are_server_arguments():
    """Validators build a bare vllm.LLM from `engine_kwargs`: an OpenAI-server argument there (a tool
    parser) fails every reference engine's start, as it did the cheater network's once."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from cluster.deployment import EngineDefaults

    defaults = EngineDefaults()
    assert set(defaults.engine_kwargs) <= {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(defaults.serving_kwargs) <= {f.name for f in dataclasses.fields(FrontendArgs)}


def test_the_gateway_offers_tool_calls_with_the_one_parser_every_node_runs(tmp_path):
    from deploy.plane import gateway_config

    def parser(**fields):
        cfg = NetworkConfig(state_dir=tmp_path, **fields)
        return gateway_config(cfg, 1, "0x" + "ab" * 32, "key", True).tool_call_parser

    assert parser() == "pythonic"  # the default nodes', and open nodes' (meritnet node serve)
    hermes = {"serving_kwargs": {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}}
    assert parser(engine=hermes) is None  # open nodes would still run pythonic: not one parser
    assert parser(engine=hermes, admit_open_nodes=False) == "hermes"
