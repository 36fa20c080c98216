//! `cohort-sim fleet`: what it writes for a fleet of real processes (a Kubernetes Indexed Job)
//! loads with the server's and the clients' own loaders, and the clients' partitions split the
//! data set exactly.

use std::path::Path;

use cohort::client::config::ClientConfig;
use cohort::common::data::{read_idx, IdxArray};
use cohort::io::files::{open_maybe_gz, DataSource};
use cohort::scenarios::fleet::{open_scenario, write_fleet, FleetOptions, FleetPartition};
use cohort::scenarios::runner::default_data_dir;

fn idx(path: &Path) -> IdxArray {
    read_idx(open_maybe_gz(path).unwrap(), &path.display().to_string()).unwrap()
}

/// Each example as its pixels followed by its label, sorted.
fn rows(images: &IdxArray, labels: &IdxArray) -> Vec<Vec<u8>> {
    let width = images.dims[1] * images.dims[2];
    assert_eq!(images.dims[0], labels.dims[0]);
    let mut rows: Vec<Vec<u8>> = (0..labels.dims[0])
        .map(|i| {
            let mut row = images.data[i * width..(i + 1) * width].to_vec();
            row.push(labels.data[i]);
            row
        })
        .collect();
    rows.sort_unstable();
    rows
}

fn options(out: &Path, partition: FleetPartition) -> FleetOptions {
    let overrides: Vec<String> = [
        "data.train_examples=3000",
        "data.test_examples=500",
        "federation.secagg.degree=2",
        "federation.secagg.threshold=2",
        "federation.secagg.dropout_tolerance=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    FleetOptions {
        out: out.to_path_buf(),
        scenario: open_scenario(Path::new("quickstart"), Some(3), &overrides).unwrap(),
        partition,
        sans: vec!["cohort-server".into(), "cohort-server.cohort.svc.cluster.local".into()],
        port: 4433,
        server: None,
        metrics_listen: Some("0.0.0.0:9464".parse().unwrap()),
        client_state_dir: "/var/lib/cohort-client".into(),
        data_dir: None,
    }
}

#[test]
fn a_fleet_of_three_loads_and_splits_the_data_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mnist = default_data_dir().join("mnist");
    let all = {
        let (mut images, mut labels) =
            (idx(&mnist.join("train-images.idx3-ubyte.gz")), idx(&mnist.join("train-labels.idx1-ubyte.gz")));
        images.dims[0] = 3000;
        images.data.truncate(3000 * 28 * 28);
        labels.dims[0] = 3000;
        labels.data.truncate(3000);
        rows(&images, &labels)
    };
    for partition in [FleetPartition::Iid, FleetPartition::NonIid] {
        let out = tmp.path().join(format!("{partition:?}"));
        let summary = write_fleet(&options(&out, partition)).unwrap();
        assert_eq!(summary.clients.len(), 3);
        assert_eq!(summary.server, "cohort-server:4433");
        assert_eq!((summary.train_examples, summary.test_examples), (3000, 500));

        let server = cohort::server::config::ServerConfig::load(&out.join("server/server.toml")).unwrap();
        assert_eq!(server.metrics_listen, Some("0.0.0.0:9464".parse().unwrap()));
        let run = server.run.expect("the fleet's server.toml has its run");
        assert_eq!(run.federation.clients_per_round, 3, "the cohort is fitted to the fleet");
        assert_eq!(run.test_data.unwrap().load().unwrap().len(), 500);
        assert!(out.join("server/ca.pem").is_file() && out.join("server/cohort.db").is_file());

        // The CA of the server's state directory, which every client's identity must carry.
        let server_state = cohort::server::pki::StatePaths::new(out.join("server"));
        let server_identity = cohort::server::pki::server_identity(&server_state).unwrap();

        let mut seen = Vec::new();
        let mut ids = Vec::new();
        for (i, client) in summary.clients.iter().enumerate() {
            assert_eq!(client.index, i);
            let dir = out.join("clients").join(i.to_string());
            assert_eq!(out.join(&client.dir), dir);
            // The client's own loader and checks, as `cohort-client check` runs them.
            let config = ClientConfig::load(&dir.join("client.toml")).unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(config.server, "cohort-server:4433");
            assert_eq!(config.server_name.as_deref(), Some("cohort-server"));
            assert_eq!(config.state_dir.as_deref(), Some(Path::new("/var/lib/cohort-client")));
            let identity = config.identity.load().unwrap_or_else(|e| panic!("client {i}: {e}"));
            ids.push(identity.subject().unwrap());
            identity.check_signed_by_ca().unwrap();
            assert!(identity.ca == server_identity.ca, "client {i}: its identity carries the fleet's CA");
            // Its folder (a pod's volume) holds its own key and no other client's.
            let pems: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.ends_with(".pem"))
                .collect();
            assert_eq!(pems, [format!("{}.pem", client.id)], "client {i}: only its own identity");
            assert_eq!(ids[i], client.id);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let key = dir.join(format!("{}.pem", client.id));
                assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o077, 0, "the key is private");
            }
            let Some(DataSource::Idx { images, labels, .. }) = &config.data else { panic!("client {i}: not IDX") };
            let data = config.data.as_ref().unwrap().load().unwrap();
            assert_eq!(data.len(), client.examples);
            assert_eq!(data.label_counts(), client.label_counts);
            seen.extend(rows(&idx(images), &idx(labels)));
        }
        seen.sort_unstable();
        assert_eq!(seen.len(), all.len(), "{partition:?}: every example once");
        assert!(seen == all, "{partition:?}: the partitions are disjoint and cover the first 3,000 examples");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3, "one identity per client");
        if partition == FleetPartition::NonIid {
            for client in &summary.clients {
                let labels = client.label_counts.iter().filter(|&&c| c > 0).count();
                // 3,000 examples sorted by label, cut into 6 shards of 500: a shard spans at most
                // three digits (about 300 examples each).
                assert!(labels <= 6, "two label-sorted shards give few labels: {:?}", client.label_counts);
            }
        }
    }

    // A folder that holds something is never written over (a CA, keys).
    let err = write_fleet(&options(&tmp.path().join("Iid"), FleetPartition::Iid)).unwrap_err();
    assert!(err.contains("not an empty folder"), "{err}");
}

#[test]
fn fleet_fits_the_scenario_to_the_clients_and_overrides_have_the_last_word() {
    let quick = Path::new("quickstart");
    let small =
        ["federation.secagg.degree=2", "federation.secagg.threshold=2", "federation.secagg.dropout_tolerance=0"];
    let small: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    let s = open_scenario(quick, Some(3), &small).unwrap();
    assert_eq!((s.clients, s.federation.clients_per_round, s.federation.min_clients), (3, 3, 3));
    let mut fewer = small.clone();
    fewer.push("federation.clients_per_round=2".into());
    fewer.push("federation.min_clients=2".into());
    let err = open_scenario(quick, Some(3), &fewer).unwrap_err();
    assert!(err.contains("federation.secagg"), "a cohort of 2 cannot have degree 2: {err}");
    let s = open_scenario(quick, Some(40), &[]).unwrap();
    assert_eq!((s.clients, s.federation.clients_per_round), (40, 10), "a smaller cohort stays as it is");
    let err = open_scenario(Path::new("/nowhere/nonesuch.toml"), Some(3), &[]).unwrap_err();
    assert!(err.contains("nonesuch") && err.contains("quickstart"), "{err}");
}
