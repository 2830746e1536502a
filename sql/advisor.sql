-- Helper of dbopt.index_advice(): the planner's generic-plan cost of a (normalised, $n-parameterised)
-- statement, before and after a hypothetical index made with hypopg. NULLs when the statement cannot
-- be planned here (e.g. its text was cut, or it references a temporary table); any error is caught
-- in this block's own subtransaction, so advice never fails because one statement cannot be explained.
CREATE FUNCTION dbopt._hypothetical_costs(query text, nparams int, index_sql text,
                                          OUT cost_before float8, OUT cost_after float8)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    plan json;
    args text := '';
BEGIN
    IF nparams > 0 THEN
        args := '(' || array_to_string(array_fill('NULL'::text, ARRAY[nparams]), ', ') || ')';
    END IF;
    BEGIN
        EXECUTE 'PREPARE dbopt_advice AS ' || query;
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
        EXECUTE 'EXPLAIN (FORMAT JSON) EXECUTE dbopt_advice' || args INTO plan;
        cost_before := (plan->0->'Plan'->>'Total Cost')::float8;
        -- A cached generic plan would not see the new index: plan the statement afresh.
        DEALLOCATE dbopt_advice;
        PERFORM hypopg_create_index(index_sql);
        EXECUTE 'PREPARE dbopt_advice AS ' || query;
        EXECUTE 'EXPLAIN (FORMAT JSON) EXECUTE dbopt_advice' || args INTO plan;
        cost_after := (plan->0->'Plan'->>'Total Cost')::float8;
        PERFORM hypopg_reset();
        DEALLOCATE dbopt_advice;
    EXCEPTION WHEN OTHERS THEN
        cost_before := NULL;
        cost_after := NULL;
    END;
END
$$;
REVOKE ALL ON FUNCTION dbopt._hypothetical_costs(text, int, text) FROM PUBLIC;

-- Helper of dbopt.index_advice(): the planner's row estimate for one condition on a table, to tell
-- which of several range columns is the selective one. NULL when the condition cannot be planned.
CREATE FUNCTION dbopt._estimated_rows(tbl text, condition text) RETURNS float8
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM ' || tbl || ' WHERE ' || condition INTO plan;
    RETURN (plan->0->'Plan'->>'Plan Rows')::float8;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dbopt._estimated_rows(text, text) FROM PUBLIC;
