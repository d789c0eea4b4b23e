//! The status page in a real browser: headless Chromium (Debian's `chromium`) renders
//! `/status` of the real server; the test reads the rendered DOM and checks the screenshot's
//! pixels for the pool history lines.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Server;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .map(|d| Path::new(d).join(name))
                .collect::<Vec<_>>()
        })
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `args`, giving the page's timers 6 s of virtual time.
fn browse(browser: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("cannot run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pixels close to `rgb`.
fn count_color(image: &[u8], channels: usize, rgb: [u8; 3]) -> usize {
    image
        .chunks(channels)
        .filter(|p| (0..3).all(|i| p[i].abs_diff(rgb[i]) < 40))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_pools_in_a_real_browser() {
    let Some(browser) = chromium() else {
        println!("skipped: chromium (Debian's chromium package) is not installed");
        return;
    };
    let s = Server::start().await;
    s.environment(21, 2, serde_json::json!({})).await;
    let _runner = s.claim(21, 0).await;
    s.wait_idle(21, 2).await;
    let profile = std::env::temp_dir().join(format!("poseidon-chromium-{}", std::process::id()));
    let url = format!("{}/status?interval=500", s.base);

    let dom = browse(&browser, &profile, &url, &["--dump-dom"]);
    let row = dom
        .split("<tr data-environment=\"21\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row for environment 21 in the rendered page: {dom}"));
    let cells: Vec<&str> = row
        .split("<td")
        .skip(1)
        .map(|c| c.split('>').nth(1).unwrap_or("").split('<').next().unwrap())
        .collect();
    // environment, idle, used, starting, target
    assert_eq!(&cells[..5], ["21", "2", "1", "0", "2"], "{row}");
    assert!(dom.contains("<svg"), "no history chart: {row}");

    let shot = profile.join("status.png");
    browse(
        &browser,
        &profile,
        &url,
        &[
            "--window-size=1000,700",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1000, 700));
    let channels = info.color_type.samples();
    // Below the headings (whose legend uses the same colours): the table with the history lines.
    let row_bytes = info.line_size;
    let table = &pixels[190 * row_bytes..info.buffer_size()];
    // The idle (blue) and used (orange) history lines are drawn (each about 220 px by 2 px).
    let blue = count_color(table, channels, [37, 99, 235]);
    let orange = count_color(table, channels, [234, 88, 12]);
    assert!(blue > 200, "no idle line in the screenshot ({blue} px)");
    assert!(orange > 200, "no used line in the screenshot ({orange} px)");
    let _ = std::fs::remove_dir_all(&profile);
}
