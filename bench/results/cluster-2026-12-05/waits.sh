#!/bin/bash
# waits.sh URL SECONDS: samples pg_stat_activity of cattery's backends every 20 ms
U=$1; N=$(( $2 * 50 ))
for i in $(seq $N); do echo "select coalesce(wait_event_type,'CPU')||':'||coalesce(wait_event,'-') from pg_stat_activity where application_name='cattery' and state='active';"; echo "select pg_sleep(0.02);"; done | psql -X -A -t -q "$U" | grep -v '^$' | sort | uniq -c | sort -rn
