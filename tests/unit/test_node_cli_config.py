"""`meritnet node serve --config node.yaml` and --advertise: the node as a ray.serve.llm LLMConfig,
validated by ray.serve.llm itself, mapped onto the network's node deployment, and every refusal saying
what to change. No Ray started: only the configs are built."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cluster.deployment import EngineDefaults, llm_config_for
from cluster.records import NodeSpec
from deploy.config import CPU_ENGINE_ENV
from deploy.node_cli import node_app
from deploy.node_config import (
    NODE_YAML_EXAMPLE,
    NodeConfigError,
    advertised_endpoint,
    node_settings,
    read_node_yaml,
)

GPU_YAML = NODE_YAML_EXAMPLE + "\nruntime_env:\n  env_vars: {HF_HOME: /models}\n"


def write(tmp_path, text: str):
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def built(settings) -> dict:
    """The LLMConfig the network's node deployment would run for these settings."""
    spec = NodeSpec(
        node_id="served",
        operator="0x" + "00" * 20,
        model_id=settings.model,
        model_source=settings.source or settings.model,
        accelerator_type=settings.accelerator,
        capacity=settings.capacity,
    )
    return llm_config_for(spec, settings.engine).model_dump()


def test_the_readme_gpu_example_asks_ray_for_gpus_and_keeps_vllm_defaults(tmp_path):
    s = node_settings(read_node_yaml(write(tmp_path, GPU_YAML)))
    assert (s.model, s.source, s.accelerator, s.uses_gpu) == (
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "H100",
        True,
    )
    assert s.env_vars == {"HF_HOME": "/models"}  # no CPU thread pinning on a GPU node
    cfg = built(s)
    assert cfg["engine_kwargs"]["max_model_len"] == 8192
    assert cfg["engine_kwargs"]["tensor_parallel_size"] == 2 and cfg["engine_kwargs"]["dtype"] == "bfloat16"
    assert "enforce_eager" not in cfg["engine_kwargs"]  # the CPU defaults stay off GPUs
    bundles = cfg["placement_group_config"]["bundles"]
    assert [b.get("GPU") for b in bundles] == [1.0, 1.0] and all("accel_H100" in b for b in bundles)
    assert cfg["deployment_config"]["max_ongoing_requests"] == 128


def test_flags_alone_keep_the_cpu_node_of_before():
    s = node_settings(accelerator="CPU")
    assert not s.uses_gpu and s.model == "default" and s.capacity == 8
    assert s.engine == EngineDefaults() and s.env_vars == CPU_ENGINE_ENV


def test_a_cpu_config_layers_its_engine_kwargs_over_the_cpu_defaults(tmp_path):
    text = "model_loading_config: {model_id: tiny}\nengine_kwargs: {max_model_len: 2048, max_num_seqs: 4}\n"
    s = node_settings(read_node_yaml(write(tmp_path, text)), accelerator="CPU-AVX2")
    assert not s.uses_gpu and s.capacity == 4 and s.engine.max_model_len == 2048
    assert s.engine.engine_kwargs["enforce_eager"] is True
    assert s.env_vars["OMP_NUM_THREADS"] == "1"


def test_shortcut_flags_override_the_config():
    s = node_settings(
        {
            "model_loading_config": {"model_id": "m"},
            "accelerator_type": "L4",
            "engine_kwargs": {"max_model_len": 4096},
        },
        engine_kwargs={"max_model_len": 8192, "tensor_parallel_size": 4},
    )
    assert s.engine.max_model_len == 8192 and s.engine.engine_kwargs == {"tensor_parallel_size": 4}


@pytest.mark.parametrize(
    ("config", "flags", "says"),
    [
        ({"model_loading_config": {"model_id": "m"}, "acelerator_type": "H100"}, {}, "acelerator_type"),
        (
            {"model_loading_config": {"model_id": "m"}, "accelerator_type": "H1000"},
            {},
            "Unsupported accelerator",
        ),
        ({"engine_kwargs": {}}, {}, "model_loading_config"),
        ({"model_loading_config": {"model_id": "m"}}, {}, "--accelerator NAME"),
        ({"model_loading_config": {"model_id": "m"}, "accelerator_type": "H100"}, {}, "max_model_len"),
        (
            {"model_loading_config": {"model_id": "m"}, "accelerator_type": "L4"},
            {"accelerator": "H100"},
            "contradicts accelerator_type",
        ),
        ({"model_loading_config": {"model_id": "m"}}, {"model": "x", "accelerator": "C"}, "contradicts"),
        (
            {
                "model_loading_config": {"model_id": "m"},
                "placement_group_config": {"bundles": [{"GPU": 1}]},
            },
            {"accelerator": "C"},
            "remove placement_group_config",
        ),
        (
            {"model_loading_config": {"model_id": "m"}, "deployment_config": {"num_replicas": 2}},
            {"accelerator": "C"},
            "num_replicas must be 1",
        ),
        (
            {"model_loading_config": {"model_id": "m"}, "deployment_config": {"autoscaling_config": {}}},
            {"accelerator": "C"},
            "autoscaling_config",
        ),
        (
            {"model_loading_config": {"model_id": "m"}, "runtime_env": {"pip": ["x"]}},
            {"accelerator": "C"},
            "env_vars only",
        ),
        (
            {"model_loading_config": {"model_id": "m"}, "deployment_config": {"max_ongoing_requests": 0}},
            {"accelerator": "C"},
            "max_ongoing_requests",
        ),
    ],
)
def test_a_bad_config_is_refused_with_what_to_change(config, flags, says):
    with pytest.raises(NodeConfigError) as info:
        node_settings(config, **flags)
    assert says in str(info.value)


def test_bad_yaml_and_a_non_mapping_are_refused(tmp_path):
    with pytest.raises(NodeConfigError, match="not valid YAML"):
        read_node_yaml(write(tmp_path, "engine_kwargs: [\n"))
    with pytest.raises(NodeConfigError, match="model_loading_config:"):  # shows the example
        read_node_yaml(write(tmp_path, "- a list\n"))
    with pytest.raises(NodeConfigError, match="cannot read"):
        read_node_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("host", "advertise", "expected"),
    [
        ("127.0.0.1", None, "http://127.0.0.1:8100"),
        ("localhost", None, "http://127.0.0.1:8100"),
        ("::1", None, "http://[::1]:8100"),
        ("0.0.0.0", "https://node.example.com", "https://node.example.com"),
        ("0.0.0.0", "http://203.0.113.7:8100/", "http://203.0.113.7:8100"),
    ],
)
def test_the_recorded_endpoint_is_the_loopback_bind_or_the_advertised_url(host, advertise, expected):
    assert advertised_endpoint(host, 8100, advertise) == expected


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5"])
def test_a_reachable_bind_without_advertise_is_refused(host):
    with pytest.raises(NodeConfigError, match=r"--advertise http://203\.0\.113\.7:8100"):
        advertised_endpoint(host, 8100, None)


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://u:p@host:1", "https://host/path"])
def test_a_malformed_advertised_url_is_refused(url):
    with pytest.raises(NodeConfigError, match="--advertise"):
        advertised_endpoint("0.0.0.0", 8100, url)


def test_serve_refuses_before_starting_anything(tmp_path):
    runner = CliRunner()
    out = runner.invoke(node_app, ["serve", "--accelerator", "CPU", "--host", "0.0.0.0"])
    assert out.exit_code == 2 and "--advertise" in out.output
    out = runner.invoke(node_app, ["serve", "--config", str(write(tmp_path, "x: [")), "--accelerator", "C"])
    assert out.exit_code == 2 and "not valid YAML" in out.output
    out = runner.invoke(node_app, ["serve", "--accelerator", "C", "--engine-kwargs", "[1]"])
    assert out.exit_code == 2 and "JSON object" in out.output


def test_join_refuses_a_loopback_endpoint_for_a_remote_network(tmp_path):
    key = tmp_path / "operator.key"
    key.write_text("0x" + "11" * 32)
    key.chmod(0o600)
    args = ["join", "--network", "http://203.0.113.9:8000", "--node-id", "n", "--key-file", str(key)]
    args += ["--model", "m", "--accelerator", "C", "--endpoint", "http://127.0.0.1:8100"]
    out = CliRunner().invoke(node_app, [*args, "--state-dir", str(tmp_path / "s")])
    assert out.exit_code == 2 and "cannot reach it" in out.output


def test_the_recorded_endpoint_is_the_advertised_url_never_a_guess_from_the_hostname():
    from deploy.open_node import OpenNode

    wild = OpenNode(model="default", accelerator="CPU", port=8100, host="0.0.0.0")
    assert (wild.endpoint, wild.local_url) == ("http://127.0.0.1:8100", "http://127.0.0.1:8100")
    told = OpenNode(
        model="default", accelerator="CPU", port=8100, host="0.0.0.0", advertise="https://node.example.com"
    )
    assert (told.endpoint, told.local_url) == ("https://node.example.com", "http://127.0.0.1:8100")
