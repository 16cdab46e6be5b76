-- The Prefect server's database beside MLflow's (POSTGRES_DB creates mlflow's); run once, on an empty volume.
CREATE DATABASE prefect;
