//! The SQLSTATEs the router itself sends or acts on, named as PostgreSQL's `errcodes.txt` names
//! them (`ERRCODE_TOO_MANY_CONNECTIONS` → [`TOO_MANY_CONNECTIONS`]), so a reader sees what a code
//! means where it is used. Clients and drivers act on these: psycopg and Prisma map them to their
//! exception types, poolers retry on the class 08 and 57P0x ones.

/// 01000: a warning (NOTICE-level messages the router adds).
pub const WARNING: &str = "01000";
/// 08001: the router could not open a server connection.
pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
/// 08004: a server refused the connection for a reason the client cannot act on.
pub const SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION: &str = "08004";
/// 08006: a server connection broke.
pub const CONNECTION_FAILURE: &str = "08006";
/// 08P01: a message that breaks the protocol.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// 22023: a value the router checks (a cache hint, an end user) is malformed.
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// 25001: a statement that cannot run inside a transaction block.
pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
/// 25006: the node is read-only (a replica, or a demoted primary).
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// 25P03: idle in a transaction for too long.
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
/// 28000: not allowed to log in this way (TLS required, mechanism, user unknown).
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// 28P01: wrong password.
pub const INVALID_PASSWORD: &str = "28P01";
/// 3D000: no such database (or not in the allow-list).
pub const INVALID_CATALOG_NAME: &str = "3D000";
/// 42704: no such object (an unknown startup parameter).
pub const UNDEFINED_OBJECT: &str = "42704";
/// 53300: no connection to be had (pool full, too many clients).
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// 53400: a configured limit refused the statement (rate limits).
pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
/// 57P01: the router (or server) is shutting down.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// 57P02: the server crashed.
pub const CRASH_SHUTDOWN: &str = "57P02";
/// 57P03: the server is starting up or cannot accept connections now.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// 57P05: idle outside a transaction for too long.
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
