-- Airflow's metadata database on the warehouse server: the role `airflow` and the database `airflow`, owned by it.
--
-- Runs twice, and both times it is safe to repeat:
--   * by the postgres image's entrypoint, from /docker-entrypoint-initdb.d, when the warehouse volume is first
--     initialised (docker-compose.yml mounts this file there);
--   * by the one-shot `airflow-db-init` service on every `docker compose up`, so that a warehouse volume created
--     before Airflow joined the stack gets the database too, and a changed AIRFLOW_DB_PASSWORD takes effect.
-- It never touches the warehouse database itself; the airflow role gets no rights in it.
--
-- Reads from the environment (psql's \getenv, psql 15 or newer: the postgres:16 image has it):
--   AIRFLOW_DB_PASSWORD  required, the role's password (keep it URL-safe: it goes into Airflow's SQLAlchemy URL)
--   AIRFLOW_DB_USER      optional, default airflow
--   AIRFLOW_DB_NAME      optional, default airflow
-- Run by hand:  AIRFLOW_DB_PASSWORD=... psql -v ON_ERROR_STOP=1 -d postgres -f infra/postgres-init/10-airflow-db.sql

\set ON_ERROR_STOP on

\getenv airflow_password AIRFLOW_DB_PASSWORD
\getenv airflow_user AIRFLOW_DB_USER
\getenv airflow_db AIRFLOW_DB_NAME

\if :{?airflow_user}
\else
\set airflow_user airflow
\endif
\if :{?airflow_db}
\else
\set airflow_db airflow
\endif
\if :{?airflow_password}
\else
\set airflow_password ''
\endif

-- Refuse an empty password: without one the role could not log in over TCP (scram-sha-256), and Airflow would
-- fail later with a less helpful error.
SELECT (:'airflow_password' = '') AS airflow_password_missing \gset
\if :airflow_password_missing
DO $$ BEGIN RAISE EXCEPTION 'AIRFLOW_DB_PASSWORD is not set (see .env.example)'; END $$;
\endif

SELECT format('CREATE ROLE %I LOGIN', :'airflow_user')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'airflow_user') \gexec

-- Every run: the password follows .env.
ALTER ROLE :"airflow_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'airflow_password';

SELECT format('CREATE DATABASE %I OWNER %I', :'airflow_db', :'airflow_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'airflow_db') \gexec

-- Only the owner (and superusers) may connect to Airflow's database.
REVOKE ALL ON DATABASE :"airflow_db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"airflow_db" TO :"airflow_user";

\echo airflow metadata database ready: role :airflow_user, database :airflow_db
