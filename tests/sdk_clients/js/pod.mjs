// A pod's JavaScript: the JS SDK v3 container-credentials provider, `fromHttp`, with the
// options the default chain gives it (none: a 1 s request timeout that node-http-handler
// 4.x only warns about, 3 retries 1 s apart), configured only by the environment.
// Prints one JSON line; exits 1 without credentials.
import { fromHttp } from "@aws-sdk/credential-provider-http";

const started = performance.now();
const seconds = () => (performance.now() - started) / 1000;
try {
  const credentials = await fromHttp()();
  console.log(JSON.stringify({ access_key_id: credentials.accessKeyId, seconds: seconds() }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error), seconds: seconds() }));
  process.exitCode = 1;
}
