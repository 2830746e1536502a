//! Throws random argument vectors at every DBOPT command of a live server, then checks that the
//! server is alive, answers, and that keys the fuzzer never named are exactly as they were.

use dbopt_e2e::e2e_port;
use dbopt_e2e::redis_server::RedisServer;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

const COMMANDS: &[&str] = &[
    "DBOPT.RL.HIT",
    "DBOPT.RL.PEEK",
    "DBOPT.RL.RESET",
    "DBOPT.RL.HITALL",
    "DBOPT.RL.LEASE",
    "DBOPT.CACHE.SET",
    "DBOPT.CACHE.GET",
    "DBOPT.CACHE.DEL",
    "DBOPT.CACHE.INVALIDATE",
    "DBOPT.TAG.TOKEN",
    "DBOPT.TAG.INVALIDATE",
    "DBOPT.STATS",
    "DBOPT.VERSION",
    "dbopt.rl.hit",
    "dbopt.cache.set",
];

fn random_arg(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "k1",
        "k2",
        "t1",
        "t2",
        "plain",
        "list",
        "{x}k",
        "*",
        "k*",
        "0",
        "1",
        "2",
        "10",
        "1000",
        "-1",
        "-0",
        "+1",
        "1.5",
        "",
        " ",
        "4294967295",
        "4294967296",
        "31536000000",
        "31536000001",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999",
        "COST",
        "cost",
        "TAGS",
        "TOKEN",
        "MATCH",
        "COUNT",
        "1:0000000000000001",
        "1:",
        "1",
        "nan",
        "inf",
    ];
    match rng.next() % 5 {
        0 => (0..rng.next() % 40).map(|_| rng.next() as u8).collect(),
        1 => vec![b'a'; (rng.next() % 3000) as usize],
        _ => rng.pick(WORDS).as_bytes().to_vec(),
    }
}

#[test]
fn random_argument_vectors_never_crash_or_corrupt() {
    let mut server = RedisServer::start(e2e_port(70), &[]);
    let mut c = server.conn();
    // Keys the fuzzer never names: they must come out untouched.
    let _: Vec<i64> = redis::cmd("DBOPT.RL.HIT")
        .arg("sentinel:rl")
        .arg(100)
        .arg(3_600_000)
        .query(&mut c)
        .expect("rl");
    let _: i64 = redis::cmd("DBOPT.CACHE.SET")
        .arg("sentinel:entry")
        .arg(3_600_000)
        .arg("kept")
        .arg("TAGS")
        .arg(1)
        .arg("sentinel:tag")
        .query(&mut c)
        .expect("set");
    redis::cmd("SET")
        .arg("sentinel:plain")
        .arg("plain")
        .query::<()>(&mut c)
        .expect("set");
    redis::cmd("SET")
        .arg("plain")
        .arg("x")
        .query::<()>(&mut c)
        .expect("set");
    redis::cmd("RPUSH")
        .arg("list")
        .arg("x")
        .query::<()>(&mut c)
        .expect("rpush");
    let rl_before: Vec<u8> = redis::cmd("GET")
        .arg("sentinel:rl")
        .query(&mut c)
        .expect("get");

    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let (mut ok, mut errors) = (0, 0);
    for i in 0..20_000 {
        let name = *rng.pick(COMMANDS);
        let mut cmd = redis::cmd(name);
        let mut argv = vec![name.as_bytes().to_vec()];
        for _ in 0..rng.next() % 10 {
            let a = random_arg(&mut rng);
            cmd.arg(&a);
            argv.push(a);
        }
        match cmd.query::<redis::Value>(&mut c) {
            Ok(_) => ok += 1,
            Err(e) if e.kind() == redis::ErrorKind::IoError || e.is_connection_dropped() => {
                panic!("connection lost after {i} commands: {e}\n{}", server.log())
            }
            // A reply the client cannot parse means the server broke the protocol.
            Err(e) if e.kind() == redis::ErrorKind::ParseError => {
                panic!("unparsable reply to {argv:?}: {e}")
            }
            Err(_) => errors += 1,
        }
    }
    eprintln!("fuzz: {ok} replies, {errors} errors");
    assert!(server.alive(), "redis-server died:\n{}", server.log());
    let pong: String = redis::cmd("PING").query(&mut c).expect("ping");
    assert_eq!(pong, "PONG");
    let rl_after: Vec<u8> = redis::cmd("GET")
        .arg("sentinel:rl")
        .query(&mut c)
        .expect("get");
    assert_eq!(rl_before, rl_after);
    let entry: Option<String> = redis::cmd("DBOPT.CACHE.GET")
        .arg("sentinel:entry")
        .query(&mut c)
        .expect("get");
    assert_eq!(entry.as_deref(), Some("kept"));
    let plain: String = redis::cmd("GET")
        .arg("sentinel:plain")
        .query(&mut c)
        .expect("get");
    assert_eq!(plain, "plain");
    let info: String = redis::cmd("INFO").arg("dbopt").query(&mut c).expect("info");
    assert!(info.contains("dbopt_cache_sets"), "{info}");
    let log = server.log();
    assert!(
        !log.contains("panic") && !log.contains("internal error"),
        "a handler panicked:\n{log}"
    );
}
