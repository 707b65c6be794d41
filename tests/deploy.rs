//! The deployment files: every kustomize overlay renders, passes `kubernetes-validate --strict`
//! and `yamllint`, and agrees with what the binary really accepts (flags, environment
//! variables, ports, probes), as does the Dockerfile.

mod common;

use common::{BIN, TestCa, python_packages, test_dir};
use serde::Deserialize as _;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";
const OVERLAYS: [&str; 2] = ["dev", "production"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tools() -> PathBuf {
    python_packages("pydeps-deploy", &["kubernetes-validate", "yamllint"], "import kubernetes_validate, yamllint")
}

/// `kubectl kustomize` of an overlay.
fn render(overlay: &str) -> String {
    render_dir(&root().join("deploy/kubernetes/overlays").join(overlay))
}

/// `kubectl kustomize` of a kustomization directory.
fn render_dir(dir: &Path) -> String {
    let overlay = dir.display();
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl (with kustomize) is on the machine");
    assert!(out.status.success(), "kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// An overlay rendered into `target/deploy/`, for the validators.
fn render_to_file(overlay: &str) -> PathBuf {
    let dir = root().join("target/deploy");
    std::fs::create_dir_all(&dir).expect("target/deploy");
    let path = dir.join(format!("{overlay}.yaml"));
    std::fs::write(&path, render(overlay)).expect("write rendered manifests");
    path
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| Value::deserialize(d).expect("valid YAML")).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn python(path: &Path, module: &str, args: &[&str], files: &[PathBuf]) -> std::process::Output {
    Command::new("python3")
        .args(["-m", module])
        .args(args)
        .args(files)
        .env("PYTHONPATH", path)
        .output()
        .expect("python3 runs")
}

#[test]
fn every_overlay_renders_and_passes_strict_validation_and_yamllint() {
    let tools = tools();
    let rendered: Vec<PathBuf> = OVERLAYS.iter().map(|o| render_to_file(o)).collect();
    let out = python(
        &tools,
        "kubernetes_validate",
        &["--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION],
        &rendered,
    );
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let config = root().join("deploy/.yamllint.yaml");
    let mut files = vec![root().join("deploy/kubernetes")];
    files.extend(rendered);
    let out = python(&tools, "yamllint", &["--strict", "--config-file", &config.to_string_lossy()], &files);
    assert!(out.status.success(), "yamllint:\n{}", String::from_utf8_lossy(&out.stdout));
}

/// What `serve --help` says the binary accepts: long flags and environment variables.
fn accepted() -> (HashSet<String>, HashSet<String>) {
    let out = Command::new(BIN).args(["serve", "--help"]).output().expect("the binary runs");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let words = |prefix: &str| -> HashSet<String> {
        help.split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == '=' || c == ',')
            .filter(|w| w.starts_with(prefix))
            .map(|w| w.trim_end_matches(':').to_owned())
            .collect()
    };
    (words("--"), words("DSG_"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("an address with a port")
}

#[test]
fn manifests_agree_with_what_the_binary_accepts() {
    let (flags, vars) = accepted();
    assert!(flags.contains("--upstream") && vars.contains("DSG_LISTEN"), "the help lists flags and variables");
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay));
        let gateway_named = |kind: &str| -> &Value {
            of_kind(&docs, kind)
                .into_iter()
                .find(|d| d["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("deadline-stats-gateway")))
                .unwrap_or_else(|| panic!("{overlay}: no {kind} of the gateway"))
        };
        let config = of_kind(&docs, "ConfigMap")
            .into_iter()
            .find(|d| !d["data"]["DSG_LISTEN"].is_null())
            .unwrap_or_else(|| panic!("{overlay}: no ConfigMap of the gateway's settings"));
        let env: BTreeMap<String, String> = config["data"]
            .as_mapping()
            .expect("ConfigMap data")
            .iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        for name in env.keys() {
            let known = if name.starts_with("DSG_") {
                vars.contains(name)
            } else {
                ["OTEL_", "RUST_LOG", "AWS_"].iter().any(|p| name.starts_with(p))
            };
            assert!(known, "{overlay}: the binary does not read {name}");
        }

        let deployment = gateway_named("Deployment");
        let pod = &deployment["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(flags.contains(flag.split('=').next().unwrap_or_default()), "{overlay}: the binary has no {flag}");
        }
        let port = |name: &str| {
            container["ports"]
                .as_sequence()
                .expect("ports")
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64())
                .expect("named port")
        };
        assert_eq!(port("grpc"), port_of(&env["DSG_LISTEN"]), "{overlay}: gRPC port");
        assert_eq!(port("admin"), port_of(&env["DSG_ADMIN_LISTEN"]), "{overlay}: admin port");
        // Probes go to the admin port's plain HTTP, which works whether or not the gRPC port
        // requires client certificates.
        for (probe, path) in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
        {
            assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"), "{overlay}: {probe} port");
            assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path), "{overlay}: {probe} path");
        }
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"].as_str().and_then(|p| p.parse().ok()),
            Some(port("admin"))
        );

        let grace = humantime::parse_duration(&env["DSG_SHUTDOWN_GRACE"]).expect("grace").as_secs();
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().expect("preStop sleep");
        let termination = pod["spec"]["terminationGracePeriodSeconds"].as_u64().expect("termination grace");
        assert!(termination > pre_stop + grace, "{overlay}: the pod is killed before the gateway drains");

        // Several replicas only when they share their state; with the memory store, never two.
        let replicas = deployment["spec"]["replicas"].as_u64().expect("replicas");
        let strategy = &deployment["spec"]["strategy"];
        let hpa = &gateway_named("HorizontalPodAutoscaler")["spec"];
        if env.get("DSG_STORE").map(String::as_str) == Some("redis") {
            assert!(replicas >= 2, "{overlay}: shared state is for several replicas");
            assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"), "{overlay}");
            assert_eq!(strategy["rollingUpdate"]["maxUnavailable"].as_u64(), Some(0), "{overlay}: no capacity lost");
            assert_eq!(hpa["minReplicas"].as_u64(), Some(replicas), "{overlay}: the autoscaler keeps them");
            let has_url = env.contains_key("DSG_REDIS_URL")
                || container["env"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|e| e["name"].as_str() == Some("DSG_REDIS_URL"));
            assert!(has_url, "{overlay}: --store redis needs a Redis URL");
        } else {
            assert_eq!(replicas, 1, "{overlay}: one replica with the memory store");
            assert_eq!(strategy["type"].as_str(), Some("Recreate"), "{overlay}: never two replicas at once");
            assert_eq!(hpa["maxReplicas"].as_u64(), Some(1));
        }
        for service in of_kind(&docs, "Service")
            .into_iter()
            .filter(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("deadline-stats-gateway")))
        {
            for p in service["spec"]["ports"].as_sequence().expect("ports") {
                let target = p["targetPort"].as_str().expect("named target port");
                assert!(["grpc", "admin"].contains(&target), "{overlay}: service targets unknown port {target}");
            }
        }

        // The settings as the pod gets them pass the binary's own checks.
        let mut check = Command::new(BIN);
        check.args(&args).arg("--check-config").env_clear().envs(&env);
        // Variables the pod gets from elsewhere (a Secret) have a stand-in value here.
        for var in container["env"].as_sequence().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name");
            check.env(name, var["value"].as_str().unwrap_or("redis://from-a-secret:6379"));
        }
        // Files the pod gets from volumes: real certificates made here, and the overlay's own
        // policy file (so a policy that does not parse fails here).
        let dir = test_dir(&format!("deploy-{overlay}"));
        let ca = TestCa::new("deploy test CA");
        let server = ca.server(&dir, "server");
        let files = [
            ("DSG_TLS_CERT", server.cert.clone()),
            ("DSG_TLS_KEY", server.key.clone()),
            ("DSG_TLS_CLIENT_CA", ca.write(&dir, "ca.crt")),
            ("DSG_AUTHZ_POLICY", root().join(format!("deploy/kubernetes/overlays/{overlay}/authz-policy.toml"))),
            ("DSG_UPSTREAM_ROUTES", root().join(format!("deploy/kubernetes/overlays/{overlay}/upstream-routes.toml"))),
        ];
        for (var, file) in files {
            if env.contains_key(var) {
                check.env(var, file);
            }
        }
        check
            .env("DSG_LISTEN", "127.0.0.1:0")
            .env("DSG_ADMIN_LISTEN", "127.0.0.1:1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        let out = check.output().expect("the binary runs");
        assert!(out.status.success(), "{overlay}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().last(), Some("configuration ok"), "{overlay}: {stdout}");
        if env.contains_key("DSG_UPSTREAM_ROUTES") {
            assert!(stdout.contains("routes ok: 2 routes (1 discovering their farms) and a [default]"), "{stdout}");
        }
    }
}

#[test]
fn the_dockerfile_agrees_with_the_binary_and_the_manifests() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut env = BTreeMap::new();
    let (mut exposed, mut cmd) = (Vec::new(), Vec::new());
    let joined = dockerfile.replace("\\\n", " ");
    for line in joined.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV K=V");
                env.insert(k.to_owned(), v.to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("EXPOSE ") {
            exposed.extend(rest.split_whitespace().map(|p| p.parse::<u64>().expect("port")));
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            cmd = serde_json::from_str::<Vec<String>>(rest).expect("CMD in exec form");
        }
    }
    assert!(dockerfile.contains("cargo build --locked --profile production"));
    assert!(dockerfile.contains("COPY --from=build /src/target/production/deadline-stats-gateway"));
    assert!(dockerfile.contains("USER 65532"), "runs as non-root");
    for arg in ["ARG RUST_IMAGE=rust:1.95-bookworm", "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot"] {
        assert!(dockerfile.contains(arg), "the base images are build arguments with today's defaults: {arg}");
    }
    assert!(dockerfile.contains("AS prebuilt"), "a stage packages a binary built outside");
    assert_eq!(exposed, vec![port_of(&env["DSG_LISTEN"]), port_of(&env["DSG_ADMIN_LISTEN"])]);
    assert_eq!(cmd, vec!["serve", "--upstream", "aws"]);
    let (_, vars) = accepted();
    assert!(env.keys().all(|k| vars.contains(k)), "every ENV is a variable the binary reads: {env:?}");
    let base = documents(&render("production"));
    let container = &of_kind(&base, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let ports: Vec<u64> =
        container["ports"].as_sequence().expect("ports").iter().filter_map(|p| p["containerPort"].as_u64()).collect();
    assert_eq!(ports, exposed, "the image exposes what the pod declares");

    let out = Command::new(BIN)
        .args(&cmd)
        .arg("--check-config")
        .env_clear()
        .envs(&env)
        .env("DSG_REGION", "us-west-2")
        .env("DSG_LISTEN", "127.0.0.1:0")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// checkov (from PyPI) in a virtual environment of its own under `target/`: it pins older
/// botocore and packaging than the other Python tools here use.
fn checkov() -> PathBuf {
    let venv = root().join("target/checkov-venv");
    let bin = venv.join("bin/checkov");
    let works = || Command::new(&bin).arg("--version").output().is_ok_and(|o| o.status.success());
    if !works() {
        let venv_with = |args: &[&str]| {
            let _ = std::fs::remove_dir_all(&venv);
            Command::new("python3").args(["-m", "venv"]).args(args).arg(&venv).status().is_ok_and(|s| s.success())
        };
        let install = ["install", "--quiet", "--disable-pip-version-check", "checkov"];
        let installed = if venv_with(&[]) {
            Command::new(venv.join("bin/pip")).args(install).status()
        } else {
            // A Debian python3 without python3-venv has no ensurepip: make the environment
            // without pip and install into it with the machine's own pip.
            assert!(venv_with(&["--without-pip"]), "python3 -m venv failed");
            Command::new("python3").args(["-m", "pip", "--python"]).arg(venv.join("bin/python")).args(install).status()
        };
        assert!(installed.is_ok_and(|s| s.success()), "pip could not install checkov");
        assert!(works(), "checkov installed but does not run");
    }
    bin
}

/// Every failed check of a checkov run (`-o json`), as `file resource check: name`.
fn checkov_failures(output: &std::process::Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&output.stdout);
    let reports: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("checkov printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&output.stderr))
    });
    let reports = match reports {
        serde_json::Value::Array(all) => all,
        one => vec![one],
    };
    let mut failed = Vec::new();
    for report in &reports {
        assert!(report["summary"]["passed"].as_u64() > Some(0), "checkov checked nothing: {report}");
        for f in report["results"]["failed_checks"].as_array().into_iter().flatten() {
            failed.push(format!("{} {} {}: {}", f["file_path"], f["resource"], f["check_id"], f["check_name"]));
        }
    }
    failed
}

#[test]
fn the_manifests_and_the_dockerfile_pass_checkov() {
    let checkov = checkov();
    let dir = root().join("target/deploy-checkov");
    std::fs::create_dir_all(&dir).expect("target/deploy-checkov");
    let mut files = Vec::new();
    for (name, kustomization) in [
        ("base", root().join("deploy/kubernetes/base")),
        ("dev", root().join("deploy/kubernetes/overlays/dev")),
        ("production", root().join("deploy/kubernetes/overlays/production")),
    ] {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, render_dir(&kustomization)).expect("writes");
        files.push(path);
    }
    let mut k8s = Command::new(&checkov);
    k8s.args(["--framework", "kubernetes", "--quiet", "-o", "json", "--skip-download"]);
    for f in &files {
        k8s.arg("-f").arg(f);
    }
    let failed = checkov_failures(&k8s.output().expect("checkov runs"));
    assert!(failed.is_empty(), "checkov (kubernetes) failed:\n{}", failed.join("\n"));

    let docker = Command::new(&checkov)
        .args(["--framework", "dockerfile", "--quiet", "-o", "json", "--skip-download", "-f"])
        .arg(root().join("deploy/Dockerfile"))
        .output()
        .expect("checkov runs");
    let failed = checkov_failures(&docker);
    assert!(failed.is_empty(), "checkov (dockerfile) failed:\n{}", failed.join("\n"));
}
