//! Docker benchmark for BENCHMARKS.md (run with `cargo xtask bench`, after `cargo xtask
//! images`): for each SI image, the time from `docker run` (create + start on the left
//! network, the right one connected right after) to "forwarding ready" in its log, median of
//! 5; the SI's idle RSS; the image sizes.

use std::time::{Duration, Instant};

use docknfv_tests::docker::{
    DockerChain, Spec, DNSMASQ_IMAGE, DOCKVPN_IMAGE, DOCKWALL_IMAGE, HOST_IMAGE,
};
use docknfv_tests::measure::{median, rss_kib};

const ROUNDS: usize = 5;

fn main() {
    let chain = DockerChain::new();
    println!("Docker benchmark (median of {ROUNDS} runs each)");
    println!(
        "{:<28} {:>18} {:>16} {:>10}",
        "image", "run → ready (ms)", "in-process (ms)", "RSS (MiB)"
    );
    for (image, tun) in [(DOCKWALL_IMAGE, false), (DOCKVPN_IMAGE, true)] {
        let (mut wall, mut inside, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let mut spec: Spec = chain.service_instance(&format!("bench-{round}"), image);
            spec.tun_device = tun;
            let started = Instant::now();
            let si = chain.run(spec);
            chain.connect(&si, &chain.right, &format!("{}.2", chain.right_net));
            let line = loop {
                if let Some(line) = chain
                    .logs(&si)
                    .lines()
                    .find(|l| l.contains("forwarding ready"))
                {
                    break line.to_owned();
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{image} not ready:\n{}",
                    chain.logs(&si)
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            wall.push(started.elapsed().as_secs_f64() * 1000.0);
            let elapsed_ms = line
                .split("elapsed_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            inside.push(elapsed_ms);
            std::thread::sleep(Duration::from_secs(2));
            rss.push(rss_kib(chain.pid(&si)) as f64 / 1024.0);
            chain.remove(&si);
        }
        println!(
            "{image:<28} {:>18.0} {:>16.0} {:>10.1}",
            median(&mut wall),
            median(&mut inside),
            median(&mut rss)
        );
    }
    println!("\nimage sizes");
    for image in [DOCKWALL_IMAGE, DOCKVPN_IMAGE, DNSMASQ_IMAGE, HOST_IMAGE] {
        println!(
            "{image:<28} {:>6.1} MB",
            chain.image_size(image) as f64 / 1e6
        );
    }
}
