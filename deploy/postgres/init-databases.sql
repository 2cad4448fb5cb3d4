-- One database per service (each service owns its tables; none reads another's). Run once, by the postgres
-- image's entrypoint, when the data volume is first initialised; migrations (`<service>-migrate`) create the tables.
CREATE DATABASE auth;
CREATE DATABASE llm;
CREATE DATABASE jobs;
