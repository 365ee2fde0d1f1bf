//! The example configs in `deploy/examples/` load as the daemons and the CLI would load them.

use std::path::{Path, PathBuf};

use medfl_coordinator::CoordinatorConfig;
use medfl_core::spec::RunSpec;
use medfl_site::SiteConfig;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn example_configs_load() {
    let coordinator =
        CoordinatorConfig::load(Some(&example("coordinator.toml"))).expect("coordinator.toml");
    assert_eq!(coordinator.chunk_size, 1 << 20);
    for (file, name) in [
        ("site-a.toml", "hospital-a"),
        ("site-b.toml", "hospital-b"),
        ("site-c.toml", "hospital-c"),
    ] {
        let site = SiteConfig::load(Some(&example(file))).expect(file);
        assert_eq!(site.name, name);
        let data = &site.datasets["breast_cancer"].path;
        assert!(data.exists(), "{file}: {} exists", data.display());
    }
    let spec = std::fs::read_to_string(example("run-breast-cancer.toml")).expect("run spec");
    let spec = RunSpec::from_toml(&spec).expect("run-breast-cancer.toml");
    assert_eq!(spec.task.features.len(), 30);
}
