"""psycopg 3 through dbopt-router: what a Django backend does, checked server-side.

Usage: python3 tests/python/psycopg_router.py DSN PRIMARY_PORT
Prints one line per check and exits 0 when all hold (non-zero with the failure otherwise).
"""
import sys
import time

import psycopg

dsn, primary_port = sys.argv[1], int(sys.argv[2])

with psycopg.connect(dsn, autocommit=True) as conn:
    # Server-side parameter binding (extended protocol), a read: it lands on a replica — once
    # one has replayed this user's last write (the caller ran pgbench's writes as the same user
    # just before; until a replica has them, read-your-writes sends the read to the primary).
    deadline = time.monotonic() + 10
    tries = 0
    while True:
        tries += 1
        port, in_recovery = conn.execute(
            "SELECT inet_server_port(), pg_is_in_recovery() WHERE %s = %s", (1, 1)
        ).fetchone()
        if (in_recovery and port != primary_port) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert in_recovery and port != primary_port, (port, in_recovery, tries)
    print(f"read with parameters ran on replica port {port} (try {tries})")

    conn.execute("CREATE TABLE IF NOT EXISTS py_items (id int PRIMARY KEY, name text)")
    conn.execute("TRUNCATE py_items")

    # Named prepared statements (prepare=True), reused across transactions, on whichever
    # server connection each runs.
    for i in range(20):
        conn.execute("INSERT INTO py_items VALUES (%s, %s)", (i, f"item {i}"), prepare=True)
    names = [
        conn.execute("SELECT name FROM py_items WHERE id = %s", (i,), prepare=True).fetchone()[0]
        for i in range(20)
    ]
    assert names == [f"item {i}" for i in range(20)], names
    print("20 prepared inserts and 20 prepared reads, every row read back at once")

    # A transaction stays on the primary, as one unit.
    with conn.transaction():
        conn.execute("UPDATE py_items SET name = 'changed' WHERE id = 0")
        port, = conn.execute("SELECT inet_server_port()").fetchone()
        assert port == primary_port, port
    assert conn.execute("SELECT name FROM py_items WHERE id = 0").fetchone()[0] == "changed"
    print("transaction ran on the primary and its write is visible after commit")

    # executemany (pipelined extended protocol) and COPY in both directions.
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO py_items VALUES (%s, %s)", [(100 + i, "many") for i in range(50)])
        with cur.copy("COPY py_items (id, name) FROM STDIN") as copy:
            for i in range(200, 300):
                copy.write_row((i, "copied"))
        rows = []
        with cur.copy("COPY (SELECT id FROM py_items WHERE name = 'copied' ORDER BY id) TO STDOUT") as copy:
            for row in copy.rows():
                rows.append(int(row[0]))
    assert rows == list(range(200, 300)), rows[:5]
    count = conn.execute("SELECT count(*) FROM py_items").fetchone()[0]
    assert count == 170, count
    print("executemany of 50 rows, COPY FROM of 100 rows, COPY TO read them back; 170 rows")

    # An error inside a transaction rolls it back and the connection stays usable.
    try:
        with conn.transaction():
            conn.execute("INSERT INTO py_items VALUES (0, 'duplicate')")
    except psycopg.errors.UniqueViolation:
        pass
    else:
        raise AssertionError("duplicate key accepted")
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    print("unique violation reported (SQLSTATE 23505), connection still usable")

    # Pipeline mode.
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(10)]
    assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(10)]
    print("pipeline of 10 queries answered in order")

    # Pipeline mode with reads and writes mixed, results fetched before the pipeline ends (a Flush
    # mid-pipeline): everything runs where the writes can run.
    conn.execute("CREATE TABLE IF NOT EXISTS py_pipe (id int PRIMARY KEY)")
    conn.execute("TRUNCATE py_pipe")
    for round_ in range(20):
        with conn.pipeline() as p:
            read = conn.execute("SELECT count(*) FROM py_pipe")
            p.sync() if round_ % 2 else None
            conn.execute("INSERT INTO py_pipe VALUES (%s)", (round_,))
            read.fetchone()  # sends a Flush and waits, with the INSERT still to come
            conn.execute("UPDATE py_pipe SET id = id WHERE id = %s", (round_,))
    assert conn.execute("SELECT count(*) FROM py_pipe").fetchone()[0] == 20
    print("20 pipelines mixing reads and writes (with mid-pipeline fetches) ran, no 25006")
print("psycopg: all checks passed")
