//! compose/ brought up for real with `compose/chain.sh up` under a test's own Compose
//! project name (Debian's docker-compose 1.29, or Compose v2 when the plugin is there), and
//! taken down on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::docker::DockerClient;
use crate::netns::run_checked;
use crate::prereq::require_command;

/// The compose chain of one Compose project; `down` on drop.
pub struct ComposeChain {
    pub docker: DockerClient,
    pub project: String,
    script: PathBuf,
}

impl ComposeChain {
    /// `chain.sh up` for `project` (without dashes: docker-compose 1.29 strips them from
    /// project names, Compose v2 keeps them), after removing what a killed run left.
    pub fn up(project: &str) -> ComposeChain {
        require_command("docker", "docker.io");
        let docker = DockerClient::connect();
        let compose_v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if compose_v2 {
            eprintln!("using Compose v2 (docker compose)");
        } else {
            require_command("docker-compose", "docker-compose");
            eprintln!("using docker-compose");
        }
        let chain = ComposeChain {
            docker,
            project: project.to_owned(),
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/chain.sh"),
        };
        // A run killed before its teardown left the same project behind.
        chain.down();
        run_checked(&mut chain.chain_sh("up"));
        chain
    }

    /// `compose/chain.sh ACTION` for this project.
    pub fn chain_sh(&self, action: &str) -> Command {
        let mut command = Command::new(&self.script);
        command
            .arg(action)
            .env("COMPOSE_PROJECT_NAME", &self.project);
        command
    }

    /// Best effort: it also runs before `up`, when there may be nothing to remove.
    fn down(&self) {
        let _ = self.chain_sh("down").output();
    }

    /// The running container of `service`, found by the labels both Compose versions set.
    pub fn container(&self, service: &str) -> String {
        let ps = run_checked(Command::new("docker").args([
            "ps",
            "--quiet",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]));
        let id = ps.trim().to_owned();
        assert!(!id.is_empty(), "no running {service} container");
        id
    }
}

impl Drop for ComposeChain {
    fn drop(&mut self) {
        self.down();
    }
}
