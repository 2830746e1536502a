-- Helper of dbopt.index_advice(): the planner's generic-plan cost of a (normalised, $n-parameterised)
-- statement, before and after a hypothetical index made with hypopg. NULLs when the statement cannot
-- be planned here (e.g. its text was cut, or it references a temporary table); any error is caught
-- in this block's own subtransaction, so advice never fails because one statement cannot be explained.
--
-- The statement is planned as its owner (`run_as`, SET LOCAL ROLE for the block, restored after):
-- planning may evaluate functions, and a DBA asking for advice must never run another role's code
-- with the DBA's rights. index_advice() passes only texts that PostgreSQL's parser reads as exactly
-- one SELECT/INSERT/UPDATE/DELETE, and only when the caller may act as that owner; `index_sql` is
-- built from catalog names as quoted identifiers.
CREATE FUNCTION dbopt._hypothetical_costs(query text, nparams int, index_sql text, run_as name,
                                          OUT cost_before float8, OUT cost_after float8)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    plan json;
    args text := '';
    prior_role text := current_setting('role');
BEGIN
    IF nparams > 0 THEN
        args := '(' || array_to_string(array_fill('NULL'::text, ARRAY[nparams]), ', ') || ')';
    END IF;
    BEGIN
        PERFORM set_config('role', run_as, true);
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
        PERFORM set_config('role', prior_role, true);
    EXCEPTION WHEN OTHERS THEN
        cost_before := NULL;
        cost_after := NULL;
    END;
END
$$;
REVOKE ALL ON FUNCTION dbopt._hypothetical_costs(text, int, text, name) FROM PUBLIC;
