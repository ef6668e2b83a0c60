//! The order of a batch run's commits across connections: a source's
//! watermark moves only with, or after, every sink its rows feed.

use super::postgres::{database, psql, server};
use super::{engine, scratch, text};

fn spec(src: &str, a: &str, b: &str) -> String {
    let s = server();
    format!(
        "version: 1\nname: two_targets\nconnections:\n  src: {{ type: postgres, url: \"{s}/{src}\" }}\n  a: {{ type: postgres, url: \"{s}/{a}\" }}\n  b: {{ type: postgres, url: \"{s}/{b}\" }}\nsources:\n  items: {{ connection: src, table: items, incremental: {{ column: updated_at }} }}\nsinks:\n  a_out: {{ input: items, connection: a, table: items, mode: upsert, key: [id] }}\n  b_out: {{ input: items, connection: b, table: items, mode: upsert, key: [id] }}\nstate: {{ connection: a }}\n"
    )
}

const TABLE: &str = "CREATE TABLE items (id int8 PRIMARY KEY, v text, updated_at timestamptz NOT NULL)";

#[test]
fn a_failure_between_two_connections_commits_leaves_every_row_for_the_next_run() {
    let (src, a, b) = (database("order_src"), database("order_a"), database("order_b"));
    psql(&src, TABLE);
    psql(
        &src,
        "INSERT INTO items SELECT g, 'v' || g, now() - interval '1 hour' FROM generate_series(1, 10) g",
    );
    psql(&a, TABLE);
    psql(
        &a,
        "CREATE TABLE etl_state (pipeline text, node text, watermark text NOT NULL, updated_at timestamptz, \
         PRIMARY KEY (pipeline, node))",
    );
    // b refuses row 7: its load fails after a's could have committed.
    psql(&b, TABLE);
    psql(&b, "ALTER TABLE items ADD CONSTRAINT no_seven CHECK (id <> 7)");
    let dir = scratch("commit-order");
    std::fs::write(dir.join("p.yaml"), spec(&src, &a, &b)).expect("spec");

    let out = engine(&dir, &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no_seven"), "{}", text(&out.stderr));
    assert_eq!(psql(&a, "SELECT count(*) FROM etl_state").trim(), "0", "the watermark moved past b's rows");

    psql(&b, "ALTER TABLE items DROP CONSTRAINT no_seven");
    let out = engine(&dir, &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(psql(&a, "SELECT count(*) FROM items").trim(), "10");
    assert_eq!(psql(&b, "SELECT count(*) FROM items").trim(), "10");

    // `--select` one sink: the source is read, but its watermark stays, as
    // b_out did not take the new rows.
    psql(&src, "INSERT INTO items SELECT g, 'v' || g, now() FROM generate_series(11, 15) g");
    let out = engine(&dir, &["run", "p.yaml", "--select", "a_out"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(psql(&a, "SELECT count(*) FROM items").trim(), "15");
    let out = engine(&dir, &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(psql(&b, "SELECT count(*) FROM items").trim(), "15");
}
