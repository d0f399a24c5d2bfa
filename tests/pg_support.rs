//! PostgreSQL for the inbox and outbox tests: each test gets a schema of its own (set as
//! the pool's `search_path`), migrated, and dropped when the guard goes.

#![allow(dead_code)]

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The database the tests use (trust authentication on this machine).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of one test: its pool reads and writes only there; dropped on `Drop`.
pub struct TestSchema {
    pub name: String,
    pub pool: PgPool,
}

impl TestSchema {
    /// A fresh schema `rmq_{base}_{8 hex}` with the reliable-mq tables in it.
    pub async fn new(base: &str) -> Self {
        Self::with_pool_size(base, 16).await
    }

    /// [`TestSchema::new`] with a pool of `size` connections.
    pub async fn with_pool_size(base: &str, size: u32) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("rmq_{base}_{}", &id[..8]);
        let admin = PgPool::connect(&database_url()).await.expect("PostgreSQL");
        sqlx::query(&format!("CREATE SCHEMA \"{name}\""))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let pool = pool_for(&name, size).await;
        reliable_mq::postgres::migrate(&pool)
            .await
            .expect("migrate");
        Self { name, pool }
    }

    /// Another pool on the same schema.
    pub async fn pool(&self, size: u32) -> PgPool {
        pool_for(&self.name, size).await
    }
}

/// A pool whose connections use `schema` and give up acquiring after a second.
pub async fn pool_for(schema: &str, size: u32) -> PgPool {
    let options: PgConnectOptions = database_url().parse().expect("DATABASE_URL");
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options.options([("search_path", schema)]))
        .await
        .expect("PostgreSQL pool")
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        reliable_mq_tests::sh(&format!(
            "psql -q -h 127.0.0.1 -U postgres -d test -c 'DROP SCHEMA IF EXISTS \"{}\" CASCADE' >/dev/null 2>&1",
            self.name
        ));
    }
}
