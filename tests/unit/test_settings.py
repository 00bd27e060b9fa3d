import pytest

from common.settings import GatewaySettings, SettingsError, TokenSettings, load


def test_flag_beats_env_beats_default():
    assert load(TokenSettings, [], environ={}).max_seqs == 16
    assert load(TokenSettings, [], environ={"DEJAVU_MAX_SEQS": "4"}).max_seqs == 4
    assert load(TokenSettings, ["--max-seqs", "2"], environ={"DEJAVU_MAX_SEQS": "4"}).max_seqs == 2


@pytest.mark.parametrize("argv,env,needle", [
    (["--max-seqs", "0"], {}, "--max-seqs / DEJAVU_MAX_SEQS"),
    ([], {"DEJAVU_PORT": "http"}, "DEJAVU_PORT"),
    ([], {"DEJAVU_KV_TRANSPORT": "carrier-pigeon"}, "ucx, tcp"),
    ([], {"DEJAVU_REDIS_URL": "localhost:6379"}, "--redis-url"),
    (["--lease-ttl-s", "0.5", "--lease-renew-s", "1"], {}, "--lease-ttl-s"),
    (["--stages", "2"], {}, "--pipeline / DEJAVU_PIPELINE = '': must be set when --stages is more than 1"),
    (["--stages", "2", "--stage", "2", "--pipeline", "p"], {}, "--stage / DEJAVU_STAGE = 2: must be in 0..1"),
    (["--stages", "0"], {}, "--stages / DEJAVU_STAGES = 0: must be in 1..64"),
    (["--stages", "2", "--pipeline", "a b"], {}, "--pipeline / DEJAVU_PIPELINE = 'a b': must be letters"),
    (["--microbatches", "-1"], {}, "--microbatches / DEJAVU_MICROBATCHES"),
    (["--kv-shm-mib", "2048"], {}, "--kv-shm-mib / DEJAVU_KV_SHM_MIB = 2048: must be in 0..1024"),
    ([], {"DEJAVU_KV_SHM_MIN_KIB": "-1"}, "--kv-shm-min-kib / DEJAVU_KV_SHM_MIN_KIB = -1: must be in 0..1048576"),
])
def test_bad_settings_name_the_flag_and_variable(argv, env, needle):
    with pytest.raises(SettingsError) as err:
        load(TokenSettings, argv, environ=env)
    assert needle in str(err.value)


def test_gateway_model_name():
    assert load(GatewaySettings, [], environ={}).model_name == "smollm2"
    assert load(GatewaySettings, ["--model", "/models/Llama-3/"], environ={}).model_name == "Llama-3"
    assert load(GatewaySettings, ["--served-model-name", "x"], environ={}).model_name == "x"


def test_api_keys_from_repeated_flags_or_one_variable():
    assert load(GatewaySettings, [], environ={}).api_keys == ()
    assert load(GatewaySettings, [], environ={"DEJAVU_API_KEYS": ""}).api_keys == ()
    assert load(GatewaySettings, [], environ={"DEJAVU_API_KEYS": "k1, k2"}).api_keys == ("k1", "k2")
    flags = ["--api-key", "a", "--api-key", "b"]
    assert load(GatewaySettings, flags, environ={"DEJAVU_API_KEYS": "k1"}).api_keys == ("a", "b")
    for argv, env in ((["--api-key", "good-key", "--api-key", "bad\nkey"], {}), ([], {"DEJAVU_API_KEYS": ","}),
                      ([], {"DEJAVU_API_KEYS": "good-key,,"}), (["--api-key", ""], {})):
        with pytest.raises(SettingsError) as err:  # an empty key would let an empty bearer token in
            load(GatewaySettings, argv, environ=env)
        assert "--api-key / DEJAVU_API_KEYS" in str(err.value) and "good-key" not in str(err.value)  # never printed


def test_allowed_origins_any_with_keys_none_without_some_or_none():
    """CORS by default only where a key is needed: a web page must not drive a keyless server on
    the user's machine (any page may send a preflighted POST to 127.0.0.1)."""
    assert load(GatewaySettings, [], environ={}).cors_origins == []
    assert load(GatewaySettings, ["--api-key", "k"], environ={}).cors_origins == ["*"]
    assert load(GatewaySettings, [], environ={"DEJAVU_ALLOWED_ORIGINS": ""}).cors_origins == []
    assert load(GatewaySettings, ["--api-key", "k"], environ={"DEJAVU_ALLOWED_ORIGINS": ""}).cors_origins == []
    assert load(GatewaySettings, ["--allowed-origin", "*"], environ={}).cors_origins == ["*"]
    flags = ["--allowed-origin", "https://a.example", "--allowed-origin", "http://b.example:8080"]
    assert load(GatewaySettings, flags, environ={}).cors_origins == ["https://a.example", "http://b.example:8080"]
    for bad in ("https://a.example/", "a.example", "https://a.example/chat"):  # would match no page, silently
        with pytest.raises(SettingsError, match="--allowed-origin"):
            load(GatewaySettings, ["--allowed-origin", bad], environ={})


def test_default_service_ids_differ_at_every_start():
    """A container restarted in place keeps its hostname and often its pid; the gateway skips the
    services that failed a request, so the new process must not carry the dead one's id."""
    from common.protocol import ServiceKind
    from common.service import service_id
    from common.settings import TokenSettings

    settings = TokenSettings()
    assert service_id(ServiceKind.TOKEN, settings) != service_id(ServiceKind.TOKEN, settings)
    assert service_id(ServiceKind.TOKEN, TokenSettings(service_id="token-a")) == "token-a"


def test_max_model_len_past_the_models_context_is_capped_at_it(tiny_model_path, caplog):
    """As the gateway caps it: a pool sized past the model's positions took the token service down."""
    from common.model import within_context
    from common.settings import TokenSettings

    long = TokenSettings(max_model_len=100_000)
    with caplog.at_level("WARNING", logger="common.model"):
        capped = within_context(long, tiny_model_path)
    assert capped.max_model_len == 1024 and capped.num_blocks == long.max_seqs * 1024 // long.block_size
    assert "past the model's context (1024 tokens)" in caplog.text
    short = TokenSettings(max_model_len=512)
    assert within_context(short, tiny_model_path) is short
