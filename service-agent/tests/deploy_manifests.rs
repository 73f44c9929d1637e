//! The deployment manifests under `deploy/`: every document parses into its
//! k8s-openapi type with no field the type does not know, and the agent gets
//! exactly the least privilege the spec asks for (read-only RBAC on Services,
//! EndpointSlices and Nodes; capabilities rather than `privileged`).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_yaml::Value;

const NAMESPACE: &str = "kube-system";
const NAME: &str = "service-agent";

/// One document of a manifest, in its type.
#[derive(Debug)]
enum Manifest {
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(Box<DaemonSet>),
    /// kind's own configuration (`kind: Cluster`), not a Kubernetes object.
    KindCluster(Value),
}

impl Manifest {
    fn kind(&self) -> &'static str {
        match self {
            Manifest::ServiceAccount(_) => "ServiceAccount",
            Manifest::ClusterRole(_) => "ClusterRole",
            Manifest::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Manifest::DaemonSet(_) => "DaemonSet",
            Manifest::KindCluster(_) => "Cluster",
        }
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every `*.yaml` file in `deploy/`, with where it came from.
fn load_manifests() -> anyhow::Result<Vec<(String, Manifest)>> {
    let dir = deploy_dir();
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no *.yaml in {}", dir.display());
    let mut manifests = Vec::new();
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for (index, manifest) in parse_documents(&text)
            .with_context(|| format!("in {name}"))?
            .into_iter()
            .enumerate()
        {
            manifests.push((format!("{name} document {}", index + 1), manifest));
        }
    }
    Ok(manifests)
}

/// Splits multi-document YAML and parses each document by its `kind`.
fn parse_documents(text: &str) -> anyhow::Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .with_context(|| format!("document {} is not YAML", index + 1))?;
        if value.is_null() {
            // An empty document, e.g. after a trailing `---`.
            continue;
        }
        manifests.push(parse_document(value).with_context(|| format!("document {}", index + 1))?);
    }
    Ok(manifests)
}

fn parse_document(value: Value) -> anyhow::Result<Manifest> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .context("no `kind`")?
        .to_owned();
    Ok(match kind.as_str() {
        "ServiceAccount" => Manifest::ServiceAccount(typed(value)?),
        "ClusterRole" => Manifest::ClusterRole(typed(value)?),
        "ClusterRoleBinding" => Manifest::ClusterRoleBinding(typed(value)?),
        "DaemonSet" => Manifest::DaemonSet(Box::new(typed(value)?)),
        "Cluster" => {
            let api_version = value.get("apiVersion").and_then(Value::as_str);
            ensure!(
                api_version == Some("kind.x-k8s.io/v1alpha4"),
                "kind Cluster with apiVersion {api_version:?}, expected kind.x-k8s.io/v1alpha4"
            );
            Manifest::KindCluster(value)
        }
        other => bail!("unknown kind {other:?}"),
    })
}

/// Deserializes a document into its k8s-openapi type (which checks
/// `apiVersion` and `kind`), then serializes it back and compares: the types
/// ignore fields they do not know, so a misspelt or misplaced field
/// (`hostNetwrok: true`) would otherwise pass unnoticed.
fn typed<T: DeserializeOwned + Serialize>(value: Value) -> anyhow::Result<T> {
    let object: T = serde_yaml::from_value(value.clone())
        .with_context(|| format!("not a valid {}", std::any::type_name::<T>()))?;
    let back = serde_yaml::to_value(&object)?;
    let mut differences = Vec::new();
    compare("", &value, &back, &mut differences);
    ensure!(
        differences.is_empty(),
        "fields the type does not know or changes (misspelt, misplaced or mistyped?): {}",
        differences.join("; ")
    );
    Ok(object)
}

/// Lists where `back` (the typed round trip) differs from `original`.
fn compare(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Mapping(original), Value::Mapping(back)) => {
            for (key, value) in original {
                let key_path = format!("{path}.{}", key.as_str().unwrap_or("?"));
                match back.get(key) {
                    Some(other) => compare(&key_path, value, other, out),
                    None => out.push(format!("{key_path} unknown")),
                }
            }
            for key in back.keys() {
                if !original.contains_key(key) {
                    out.push(format!("{path}.{} added", key.as_str().unwrap_or("?")));
                }
            }
        }
        (Value::Sequence(original), Value::Sequence(back)) if original.len() == back.len() => {
            for (index, (value, other)) in original.iter().zip(back).enumerate() {
                compare(&format!("{path}[{index}]"), value, other, out);
            }
        }
        _ if original == back => {}
        _ => out.push(format!("{path}: {original:?} became {back:?}")),
    }
}

fn manifests() -> Vec<(String, Manifest)> {
    load_manifests().unwrap_or_else(|error| panic!("{error:#}"))
}

/// The one document that `pick` selects; fails unless there is exactly one.
fn only<'a, T>(
    manifests: &'a [(String, Manifest)],
    what: &str,
    pick: impl Fn(&'a Manifest) -> Option<&'a T>,
) -> &'a T {
    let found: Vec<&T> = manifests
        .iter()
        .filter_map(|(_, manifest)| pick(manifest))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {what} in deploy/");
    found[0]
}

fn cluster_role(manifests: &[(String, Manifest)]) -> &ClusterRole {
    only(manifests, "ClusterRole", |m| match m {
        Manifest::ClusterRole(role) => Some(role),
        _ => None,
    })
}

fn service_account(manifests: &[(String, Manifest)]) -> &ServiceAccount {
    only(manifests, "ServiceAccount", |m| match m {
        Manifest::ServiceAccount(account) => Some(account),
        _ => None,
    })
}

fn daemon_set(manifests: &[(String, Manifest)]) -> &DaemonSet {
    only(manifests, "DaemonSet", |m| match m {
        Manifest::DaemonSet(daemon_set) => Some(daemon_set.as_ref()),
        _ => None,
    })
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template spec")
}

fn agent_container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container: the agent");
    let container = &pod.containers[0];
    assert_eq!(container.name, NAME);
    container
}

fn strings(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|value| value.to_string()).collect()
}

/// The value of a flag in `args`, given as `--flag value` or `--flag=value`;
/// fails if the flag is missing or repeated.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let prefix = format!("{name}=");
    let mut values = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        if arg == name {
            values.push(
                args.get(index + 1)
                    .unwrap_or_else(|| panic!("{name} without a value"))
                    .as_str(),
            );
        } else if let Some(value) = arg.strip_prefix(&prefix) {
            values.push(value);
        }
    }
    assert_eq!(
        values.len(),
        1,
        "{name} given {} times in {args:?}",
        values.len()
    );
    values[0]
}

#[test]
fn every_manifest_parses_into_its_type() {
    let manifests = manifests();
    for (origin, manifest) in &manifests {
        println!("{origin}: {}", manifest.kind());
    }
    let kinds: Vec<&str> = {
        let mut kinds: Vec<&str> = manifests.iter().map(|(_, m)| m.kind()).collect();
        kinds.sort_unstable();
        kinds
    };
    assert_eq!(
        kinds,
        [
            "Cluster",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ],
        "each kind exactly once"
    );
    // Namespaced objects live in kube-system; all are named service-agent.
    let account = service_account(&manifests);
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(account.metadata.name.as_deref(), Some(NAME));
    let daemon_set = daemon_set(&manifests);
    assert_eq!(daemon_set.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(daemon_set.metadata.name.as_deref(), Some(NAME));
}

#[test]
fn parser_rejects_unknown_kinds_fields_and_versions() {
    let cases = [
        (
            "unknown kind",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        ),
        ("no kind", "apiVersion: v1\nmetadata: {name: x}\n"),
        (
            "wrong apiVersion",
            "apiVersion: v1\nkind: ClusterRole\nmetadata: {name: x}\n",
        ),
        (
            "misspelt field",
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespce: kube-system}\n",
        ),
        (
            "wrong type",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: x}\n\
             rules: [{apiGroups: [''], resources: [services], verbs: get}]\n",
        ),
        (
            "kind config version",
            "apiVersion: kind.x-k8s.io/v1alpha3\nkind: Cluster\n",
        ),
        (
            "second document bad",
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n---\nkind: Pod\n",
        ),
    ];
    for (what, yaml) in cases {
        assert!(parse_documents(yaml).is_err(), "{what}: accepted\n{yaml}");
    }
    let good = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n---\n\
                apiVersion: kind.x-k8s.io/v1alpha4\nkind: Cluster\n---\n";
    let parsed = parse_documents(good).unwrap_or_else(|error| panic!("{error:#}"));
    let kinds: Vec<&str> = parsed.iter().map(Manifest::kind).collect();
    assert_eq!(kinds, ["ServiceAccount", "Cluster"]);
}

#[test]
fn kind_cluster_has_no_kube_proxy() {
    let manifests = manifests();
    let cluster = only(&manifests, "kind Cluster", |m| match m {
        Manifest::KindCluster(value) => Some(value),
        _ => None,
    });
    assert_eq!(
        cluster
            .get("networking")
            .and_then(|networking| networking.get("kubeProxyMode"))
            .and_then(Value::as_str),
        Some("none")
    );
    let roles: Vec<&str> = cluster
        .get("nodes")
        .and_then(Value::as_sequence)
        .expect("nodes")
        .iter()
        .map(|node| node.get("role").and_then(Value::as_str).expect("role"))
        .collect();
    assert_eq!(roles, ["control-plane", "worker"]);
}

#[test]
fn cluster_role_grants_exactly_read_on_services_endpointslices_nodes() {
    let manifests = manifests();
    let role = cluster_role(&manifests);
    assert_eq!(role.metadata.name.as_deref(), Some(NAME));
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role takes rules from elsewhere"
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        let names = rule.resource_names.as_deref().unwrap_or_default();
        let urls = rule.non_resource_urls.as_deref().unwrap_or_default();
        assert!(
            names.is_empty() && urls.is_empty(),
            "rules name whole resources only: {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    assert_eq!(granted, expected, "(apiGroup, resource, verb) granted");
}

#[test]
fn binding_grants_the_role_to_the_service_account_only() {
    let manifests = manifests();
    let role = cluster_role(&manifests);
    let account = service_account(&manifests);
    let binding = only(&manifests, "ClusterRoleBinding", |m| match m {
        Manifest::ClusterRoleBinding(binding) => Some(binding),
        _ => None,
    });
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert!(
        subject.api_group.as_deref().unwrap_or_default().is_empty(),
        "a ServiceAccount subject is in the core group: {subject:?}"
    );
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn daemon_set_uses_host_network_and_capabilities_not_privilege() {
    let manifests = manifests();
    let daemon_set = daemon_set(&manifests);
    let pod = pod_spec(daemon_set);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert_eq!(
        pod.service_account_name.as_ref(),
        service_account(&manifests).metadata.name.as_ref()
    );
    assert!(
        pod.service_account.is_none(),
        "deprecated serviceAccount field"
    );
    assert_ne!(pod.host_pid, Some(true), "no host PID namespace");
    assert_ne!(pod.host_ipc, Some(true), "no host IPC namespace");

    // No container of the pod is privileged, init containers included.
    let every_container = pod
        .containers
        .iter()
        .chain(pod.init_containers.as_deref().unwrap_or_default());
    for container in every_container {
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|context| context.privileged);
        assert_ne!(privileged, Some(true), "{} is privileged", container.name);
    }

    let agent = agent_container(pod);
    let capabilities = agent
        .security_context
        .as_ref()
        .and_then(|context| context.capabilities.as_ref())
        .expect("capabilities set");
    let added = capabilities.add.as_deref().unwrap_or_default();
    let added_set: BTreeSet<String> = added.iter().cloned().collect();
    assert_eq!(added.len(), added_set.len(), "duplicates in {added:?}");
    assert_eq!(
        added_set,
        strings(&["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let args = agent.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert_eq!(flag(args, "--source"), "kube");

    let env = agent.env.as_deref().unwrap_or_default();
    let node_name: Vec<_> = env.iter().filter(|var| var.name == "NODE_NAME").collect();
    assert_eq!(node_name.len(), 1, "NODE_NAME set once: {env:?}");
    assert!(node_name[0].value.is_none(), "NODE_NAME is not a constant");
    let field_path = node_name[0]
        .value_from
        .as_ref()
        .and_then(|source| source.field_ref.as_ref())
        .map(|field| field.field_path.as_str());
    assert_eq!(field_path, Some("spec.nodeName"));
}

#[test]
fn daemon_set_mounts_bpffs_and_probes_its_healthz_port() {
    let manifests = manifests();
    let pod = pod_spec(daemon_set(&manifests));
    let agent = agent_container(pod);
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = agent.volume_mounts.as_deref().unwrap_or_default();
    let host_path_of = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|mount| mount.mount_path == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted on {mount_path}"));
        let volume = volumes
            .iter()
            .find(|volume| volume.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name));
        let host_path = volume.host_path.as_ref().expect("a hostPath volume");
        (mount, host_path)
    };

    let (bpffs, host) = host_path_of("/sys/fs/bpf");
    assert_eq!(host.path, "/sys/fs/bpf");
    assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
    // Bidirectional is refused by the API server outside privileged
    // containers.
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(bpffs.read_only, Some(true), "the agent pins maps there");

    let (modules, host) = host_path_of("/lib/modules");
    assert_eq!(host.path, "/lib/modules");
    assert_eq!(modules.read_only, Some(true));

    // Socket-LB: the host's cgroup hierarchy (not the container's own
    // cgroup), read only, is what `--cgroup-path` names.
    let args = agent.args.as_deref().unwrap_or_default();
    let cgroup_path = flag(args, "--cgroup-path");
    let (cgroup, host) = host_path_of(cgroup_path);
    assert_eq!(host.path, "/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true));

    for mount in mounts {
        assert_ne!(
            mount.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{}",
            mount.mount_path
        );
    }

    let args = agent.args.as_deref().unwrap_or_default();
    let metrics = flag(args, "--metrics-addr");
    assert!(
        metrics.starts_with("127.0.0.1:"),
        "metrics on loopback: {metrics}"
    );
    let healthz_port: i32 = flag(args, "--healthz-addr")
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("--healthz-addr HOST:PORT");
    // Liveness on /livez: a node being deleted fails /healthz (so load
    // balancers drain it) and must not get the agent restarted.
    for (which, probe, path) in [
        ("liveness", &agent.liveness_probe, "/livez"),
        ("readiness", &agent.readiness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("no {which} httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{which}");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz_port),
            "{which} probe port"
        );
    }
}

/// The DaemonSet serves NodePorts with no per-cluster flag: no external
/// device, SNAT address or NodePort CIDR is named, and the agent's own
/// parser, given the DaemonSet's arguments, turns device detection on.
#[test]
fn daemon_set_enables_node_ports_without_per_cluster_flags() {
    use clap::Parser as _;
    let manifests = manifests();
    let agent = agent_container(pod_spec(daemon_set(&manifests)));
    let args = agent.args.as_deref().unwrap_or_default();
    for per_cluster in [
        "--external-device",
        "--snat-ipv4",
        "--nodeport-addresses",
        "--node-name",
    ] {
        assert!(
            !args
                .iter()
                .any(|arg| arg == per_cluster || arg.starts_with(&format!("{per_cluster}="))),
            "{per_cluster} in {args:?}"
        );
    }
    let cli = service_agent::cli::Cli::try_parse_from(
        std::iter::once("service-agent").chain(args.iter().map(String::as_str)),
    )
    .expect("the DaemonSet's arguments parse");
    let service_agent::cli::Command::Run(run) = cli.command else {
        panic!("the DaemonSet runs `service-agent run`");
    };
    let options = run.options().expect("options");
    assert!(
        options.auto_devices.is_some(),
        "external devices are detected"
    );
    assert!(options.devices.external.is_empty());
    // Device detection finds NodePort addresses and the SNAT address from
    // the Node; nothing in the manifest pins them.
    assert!(options.snat_ipv4.is_none());
}
