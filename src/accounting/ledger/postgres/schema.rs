//! The ledger table's schema, versioned: `tollgate_schema` holds one row per ledger table with
//! the version its columns are at. On start (and on every new connection) the writer brings the
//! table to [`VERSION`] by running the [`MIGRATIONS`] it lacks, in one transaction under an
//! advisory lock, so that replicas starting together migrate once.
//!
//! Edge cases: a table newer than this gateway knows, a table of that name that tollgate did not
//! make (no row in `tollgate_schema`), or a row whose table is gone, stop the start with a message
//! that says what to do; the name is checked to be a plain identifier before it is ever put into
//! SQL.

use tokio_postgres::Client;

/// The version this gateway writes.
pub(crate) const VERSION: i32 = 3;

/// Step `i` takes a table from version `i` to `i + 1`; `{t}` is the quoted table name, `{i}` the
/// bare name, for index names.
const MIGRATIONS: [&str; VERSION as usize] = [
    // 1: every field of a ledger line, `replica`, `id` as the key; the indexes the report needs.
    "CREATE TABLE {t} (
        id uuid PRIMARY KEY,
        time timestamptz NOT NULL,
        request_id text NOT NULL,
        replica text NOT NULL,
        key text NOT NULL,
        model text NOT NULL,
        endpoint text NOT NULL,
        status integer NOT NULL,
        prompt_tokens bigint NOT NULL,
        completion_tokens bigint NOT NULL,
        source text NOT NULL,
        duration_ms double precision NOT NULL,
        ttft_ms double precision,
        outcome text NOT NULL
    );
    CREATE INDEX {i}_time_idx ON {t} (time);
    CREATE INDEX {i}_key_time_idx ON {t} (key, time);
    CREATE INDEX {i}_request_id_idx ON {t} (request_id);",
    // 2: budgets: the key's group and the request's cost (NULL on lines without them).
    "ALTER TABLE {t} ADD COLUMN \"group\" text, ADD COLUMN cost numeric(30,9);
    CREATE INDEX {i}_group_time_idx ON {t} (\"group\", time);",
    // 3: upstream pools: the pool that served the request (NULL on lines from before pools).
    "ALTER TABLE {t} ADD COLUMN upstream text;",
];

/// Why the table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {table} is at schema version {found}, newer than this tollgate knows ({VERSION}); run a newer tollgate, or name another table")]
    Newer { table: String, found: i32 },
    #[error("a table {table} exists that tollgate did not make (tollgate_schema has no row for it); name another table, or drop it")]
    Foreign { table: String },
    #[error("tollgate_schema says table {table} is at version {found}, but there is no such table; delete its row from tollgate_schema to start afresh")]
    Missing { table: String, found: i32 },
    #[error("{}", super::connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("no connection within 10s")]
    Timeout,
}

impl SchemaError {
    /// Whether the table itself is the problem (not the connection): the start stops on it.
    pub(crate) fn is_permanent(&self) -> bool {
        !matches!(self, SchemaError::Database(_) | SchemaError::Timeout)
    }
}

/// Whether `name` may be a ledger table: lower-case letters, digits and `_`, not starting with a
/// digit, short enough for index names built from it (PostgreSQL cuts names at 63 bytes).
pub(crate) fn valid_table_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.len() <= 40
}

/// `name` as a quoted identifier (it passed [`valid_table_name`], so no quote is inside).
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{name}\"")
}

/// Brings `table` to [`VERSION`]: creates it, upgrades it, or says why it cannot be used.
pub(crate) async fn ensure(client: &mut Client, table: &str) -> Result<(), SchemaError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('tollgate_schema'))",
        &[],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tollgate_schema (
            table_name text PRIMARY KEY,
            version integer NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let version: Option<i32> = tx
        .query_opt(
            "SELECT version FROM tollgate_schema WHERE table_name = $1",
            &[&table],
        )
        .await?
        .map(|row| row.get(0));
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted(table)])
        .await?
        .get(0);
    let table_owned = || table.to_owned();
    let from = match (version, exists) {
        (None, false) => 0,
        (None, true) => {
            return Err(SchemaError::Foreign {
                table: table_owned(),
            })
        }
        (Some(found), _) if found > VERSION => {
            return Err(SchemaError::Newer {
                table: table_owned(),
                found,
            })
        }
        (Some(found), false) => {
            return Err(SchemaError::Missing {
                table: table_owned(),
                found,
            })
        }
        (Some(found), true) => found.max(0),
    };
    if from == VERSION {
        return Ok(());
    }
    for step in &MIGRATIONS[from as usize..] {
        let sql = step.replace("{t}", &quoted(table)).replace("{i}", table);
        tx.batch_execute(&sql).await?;
    }
    tx.execute(
        "INSERT INTO tollgate_schema (table_name, version) VALUES ($1, $2)
         ON CONFLICT (table_name) DO UPDATE SET version = $2, updated_at = now()",
        &[&table, &VERSION],
    )
    .await?;
    tx.commit().await?;
    if from == 0 {
        tracing::info!(table, version = VERSION, "ledger table created");
    } else {
        tracing::info!(
            table,
            from,
            to = VERSION,
            "ledger table upgraded to this tollgate's schema"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["tollgate_usage", "_x", "usage2"] {
            assert!(valid_table_name(good), "{good}");
        }
        for bad in [
            "",
            "2usage",
            "Usage",
            "a-b",
            "a\"b",
            "public.usage",
            &"x".repeat(41),
        ] {
            assert!(!valid_table_name(bad), "{bad}");
        }
    }
}
