// A Prisma 7 client through dbopt-router, unchanged but for one SQLCommenter tag naming the end
// user (Prisma's own `comments` plugins, as an app sets them per request). Runs model queries until
// the router refuses one, and prints what the application sees, as JSON.
//
// Usage: npx tsx prisma_limits.ts POSTGRES_URL END_USER MAX_QUERIES
import { PrismaPg } from "@prisma/adapter-pg";
import { PrismaClient } from "./generated/client.ts";

const [url, endUser, max] = process.argv.slice(2);
const prisma = new PrismaClient({
  adapter: new PrismaPg({ connectionString: url }),
  comments: [() => ({ dbopt_user: endUser })],
});

let ran = 0;
let refused: unknown = null;
for (let i = 0; i < Number(max); i++) {
  try {
    await prisma.note.findMany({ take: 1 });
    ran++;
  } catch (e) {
    refused = e;
    break;
  }
}
const e = refused as { message?: string; code?: string; meta?: unknown; cause?: unknown } | null;
console.log(
  JSON.stringify({
    ran,
    refused: e !== null,
    message: e?.message ?? null,
    code: e?.code ?? null,
    meta: e?.meta ?? null,
    cause: e?.cause ? String(e.cause) : null,
  }),
);
await prisma.$disconnect();
