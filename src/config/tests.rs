use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn shipped_file_equals_embedded_defaults() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/klaviyo-proxy.toml")).unwrap();
    assert_eq!(shipped, DEFAULT_TOML);
    assert_eq!(Config::parse(&shipped, "file").unwrap(), Config::default());
    assert_eq!(Config::parse("", "empty").unwrap(), Config::default());
}

fn err(src: &str) -> String {
    Config::parse(src, "test.toml").unwrap_err().to_string()
}

#[test]
fn errors_name_key_and_line() {
    let cases = [
        ("[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n", "line 3", "server"),
        (
            "[limits.unknown]\nburst_per_second = 0\nsteady_per_minute = 5\n",
            "line 2",
            "limits.unknown.burst_per_second",
        ),
        (
            "[limits.unknown]\nburst_per_second = 1\nsteady_per_minute = -5\n",
            "line 3",
            "limits.unknown.steady_per_minute",
        ),
        ("\n[upstream]\nurl = \"ftp://x\"\n", "line 3", "upstream.url"),
        ("[upstream]\nurl = \"https://a.klaviyo.com/api\"\n", "line 2", "upstream.url"),
        ("[server]\nlisten = \"localhost\"\n", "line 2", "server.listen"),
        (
            "[limits.operations.no_such_op]\nburst_per_second = 1\nsteady_per_minute = 1\n",
            "line 1",
            "limits.operations",
        ),
        ("[limits]\nshare = 1.5\n", "line 2", "limits.share"),
        ("[upstream]\nrevision = \"yesterday\"\n", "line 2", "upstream.revision"),
        ("[auth]\naccount_name = \"a b\"\n", "line 2", "auth.account_name"),
        ("[auth]\naccount_name = \"pk_abc\"\n", "line 2", "auth.account_name"),
        ("[auth]\nallowed_scopes = [\"profiles:read\", \"profile:red\"]\n", "line 2", "auth.allowed_scopes"),
        ("[checks]\nphone_e164 = \"drop\"\n", "line 2", "checks.phone_e164"),
    ];
    for (src, line, key) in cases {
        let e = err(src);
        assert!(e.contains(line) && e.contains(key), "{src:?} gave {e}");
    }
}

#[test]
fn overrides_and_env() {
    let c = Config::parse(
        "[limits]\nshare = 0.8\n[limits.operations.get_profiles]\nburst_per_second = 5\nsteady_per_minute = 50\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.limits.operations.len(), 1);
    let mut c = Config::default();
    let env = |k: &str| match k {
        "KLAVIYO_PROXY_LISTEN" => Some("127.0.0.1:9999".to_string()),
        "KLAVIYO_PROXY_UPSTREAM" => Some("http://127.0.0.1:1234".to_string()),
        _ => None,
    };
    c.apply_env(&env).unwrap();
    assert_eq!(c.server.listen.port(), 9999);
    assert_eq!(c.upstream.url.uri().port_u16(), Some(1234));
    let bad = |k: &str| (k == "KLAVIYO_PROXY_LISTEN").then(|| "nope".to_string());
    assert!(c.apply_env(&bad).unwrap_err().to_string().contains("KLAVIYO_PROXY_LISTEN"));
}

#[test]
fn named_env_values_parse_and_list_the_choices_when_wrong() {
    let mut c = Config::default();
    c.apply_env(&|k| match k {
        "KLAVIYO_PROXY_AUTH_MODE" => Some("inject".into()),
        "KLAVIYO_PROXY_LIMITER_STORE" => Some("redis".into()),
        "KLAVIYO_PROXY_LOG_FORMAT" => Some("json".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!((c.auth.mode, c.limiter.store, c.log.format), (AuthMode::Inject, StoreKind::Redis, LogFormat::Json));
    for (var, choices) in [
        ("KLAVIYO_PROXY_AUTH_MODE", "pass-through or inject"),
        ("KLAVIYO_PROXY_LIMITER_STORE", "local or redis"),
        ("KLAVIYO_PROXY_LOG_FORMAT", "human or json"),
    ] {
        let e = Config::default().apply_env(&|k| (k == var).then(|| "Inject".into())).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains(&format!("`Inject` is not {choices}")), "{e}");
    }
}

#[test]
fn resilience_values_are_checked() {
    Config::default().check_resilience().unwrap();
    let cases = [
        ("[retry]\nbase_ms = 0\n", "retry.base_ms"),
        ("[retry]\nbase_ms = 500\ncap_ms = 100\n", "retry.cap_ms"),
        ("[retry]\nbudget_ratio = -1.0\n", "retry.budget_ratio"),
        ("[breaker]\nwindow_ms = 1\n", "breaker.window_ms"),
    ];
    // The former name of consecutive_failures still reads.
    let old = Config::parse("[breaker]\nconsecutive_connect_failures = 7\n", "t").unwrap();
    assert_eq!(old.breaker.consecutive_failures.get(), 7);
    for (src, key) in cases {
        let e = Config::parse(src, "t").unwrap().check_resilience().unwrap_err().to_string();
        assert!(e.contains(key), "{src:?}: {e}");
    }
    assert!(err("[breaker]\nfailure_ratio = 0.0\n").contains("breaker.failure_ratio"));
    assert!(err("[retry]\nmax_attempts = 0\n").contains("retry.max_attempts"));
    assert!(err("[retry.operations]\nget_profiles = \"sometimes\"\n").contains("retry.operations"));
    assert!(err("[spool]\ndeferrable = [\"no_such_op\"]\n").contains("spool.deferrable"));
    let mut c = Config::default();
    c.apply_env(&|k| match k {
        "KLAVIYO_ENABLED" => Some("false".into()),
        "KLAVIYO_PROXY_SPOOL_PATH" => Some("/tmp/s.redb".into()),
        _ => None,
    })
    .unwrap();
    assert!(!c.upstream.enabled);
    assert_eq!(c.spool.path.as_deref(), Some(Path::new("/tmp/s.redb")));
    assert!(c.apply_env(&|k| (k == "KLAVIYO_ENABLED").then(|| "nope".into())).is_err());
}

#[test]
fn state_path_needs_a_hash_key() {
    let c = Config::parse("[limiter]\nstate_path = \"/var/lib/kp/state.json\"\n", "t").unwrap();
    let e = c.check_limiter().unwrap_err().to_string();
    assert!(e.contains("limiter.state_path") && e.contains("auth.account_hash_key"), "{e}");
    let c = Config::parse("[auth]\naccount_hash_key = \"k\"\n[limiter]\nstate_path = \"/x\"\n", "t").unwrap();
    assert_eq!(c.limiter.state_path.as_deref(), Some(Path::new("/x")));
    assert!(c.check_limiter().is_ok());
}

#[test]
fn redis_store_needs_url_and_hash_key() {
    let c = Config::parse("[limiter]\nstore = \"redis\"\n", "t").unwrap();
    assert!(c.check_limiter().unwrap_err().to_string().contains("limiter.redis_url"));
    let c =
        Config::parse("[limiter]\nstore = \"redis\"\nredis_url = \"rediss://:hunter2@redis.internal:6380/2\"\n", "t")
            .unwrap();
    let e = c.check_limiter().unwrap_err().to_string();
    assert!(e.contains("auth.account_hash_key"), "{e}");
    let mut c = c;
    c.auth.account_hash_key = Some(Secret::new("shared"));
    c.check_limiter().unwrap();
    let printed = c.to_redacted_toml();
    assert!(!printed.contains("hunter2"), "{printed}");
    let e = err("[limiter]\nredis_url = \"http://:hunter2@x\"\n");
    assert!(e.contains("line 2") && e.contains("limiter.redis_url") && !e.contains("hunter2"), "{e}");
    let e = err("[limiter]\nstore = \"memcached\"\n");
    assert!(e.contains("limiter.store"), "{e}");
}

#[test]
fn remote_bind_needs_token_and_inject_needs_key() {
    let mut c = Config::default();
    c.server.listen = "0.0.0.0:8080".parse().unwrap();
    assert!(c.check_serve().unwrap_err().to_string().contains("client_token"));
    c.server.client_token = Some(Secret::new("t"));
    let e = c.check_serve().unwrap_err().to_string();
    assert!(e.contains("server.client_token must be at least 16"), "{e}");
    c.server.client_token = Some(Secret::new("0123456789abcdef"));
    c.check_serve().unwrap();
    // The admin listener off loopback needs its own token.
    c.admin.listen = "0.0.0.0:9090".parse().unwrap();
    assert!(c.check_serve().unwrap_err().to_string().contains("admin.token"));
    c.admin.token = Some(Secret::new(""));
    assert!(c.check_serve().unwrap_err().to_string().contains("admin.token must be at least"));
    c.admin.token = Some(Secret::new("admin-0123456789abcdef"));
    c.check_serve().unwrap();
    let mut c = Config::default();
    c.auth.mode = AuthMode::Inject;
    assert!(c.resolve_key(&no_env).is_err());
    let key = |k: &str| (k == "KLAVIYO_PRIVATE_KEY").then(|| "pk_secret_123".to_string());
    c.resolve_key(&key).unwrap();
    let printed = c.to_redacted_toml();
    assert!(!printed.contains("pk_secret_123") && printed.contains("[redacted]"), "{printed}");
}
