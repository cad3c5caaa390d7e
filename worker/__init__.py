"""The arq worker: fans each event out to its integrations and delivers, with retries."""
