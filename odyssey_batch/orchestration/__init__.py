"""Airflow-facing steps over the library (the DAGs in dags/ call these)."""
