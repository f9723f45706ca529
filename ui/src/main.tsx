// The app: sign-in, the navigation, and which page the address (#/...) shows.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { type Session, onSignedOut, signIn, signOut, whoAmI } from "./api";
import { ErrorLine } from "./components";
import { startLive, stopLive } from "./live";
import { CreatePage } from "./pages/create";
import { DomainPage } from "./pages/domain";
import { EventsPage, JobsPage } from "./pages/jobs";
import { NetworksPage } from "./pages/networks";
import { Overview } from "./pages/overview";
import { StoragePage } from "./pages/storage";
import "./style.css";

function useRoute(): string {
  const [route, setRoute] = useState(location.hash.slice(1) || "/");
  useEffect(() => {
    const changed = () => setRoute(location.hash.slice(1) || "/");
    addEventListener("hashchange", changed);
    return () => removeEventListener("hashchange", changed);
  }, []);
  return route;
}

function SignIn({ onSignedIn }: { onSignedIn: (s: Session) => void }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onSignedIn(await signIn(token.trim()));
    } catch (err) {
      setError((err as Error).message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main class="signin">
      <h1>Ferrovisor</h1>
      <form onSubmit={submit}>
        <label for="token">Token</label>
        <input id="token" name="token" type="password" autocomplete="current-password" value={token} onInput={(e) => setToken(e.currentTarget.value)} required />
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        <ErrorLine error={error} />
      </form>
      <p class="hint">An API token from ferrod's token file (docs/remote.md).</p>
    </main>
  );
}

const pages: [string, string][] = [
  ["/", "Overview"],
  ["/create", "Create VM"],
  ["/storage", "Storage"],
  ["/networks", "Networks"],
  ["/jobs", "Jobs"],
  ["/events", "Events"],
];

function Page({ route, session }: { route: string; session: Session }) {
  const admin = session.role === "admin";
  if (route.startsWith("/domains/")) return <DomainPage name={decodeURIComponent(route.slice("/domains/".length))} admin={admin} />;
  switch (route) {
    case "/create":
      return <CreatePage admin={admin} />;
    case "/storage":
      return <StoragePage admin={admin} />;
    case "/networks":
      return <NetworksPage admin={admin} />;
    case "/jobs":
      return <JobsPage admin={admin} />;
    case "/events":
      return <EventsPage />;
    default:
      return <Overview />;
  }
}

function App() {
  const route = useRoute();
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    onSignedOut(() => {
      stopLive();
      setSession(null);
    });
    whoAmI().then(setSession, (e) => setError((e as Error).message));
  }, []);
  useEffect(() => {
    if (session) startLive();
  }, [session]);
  if (session === undefined) return <main>{error ? <ErrorLine error={error} /> : <p>Loading…</p>}</main>;
  if (session === null) return <SignIn onSignedIn={setSession} />;
  const leave = async () => {
    await signOut().catch(() => undefined);
    stopLive();
    setSession(null);
  };
  return (
    <>
      <header>
        <a class="brand" href="#/">
          Ferrovisor
        </a>
        <nav>
          {pages.map(([path, title]) => (
            <a href={`#${path}`} aria-current={route === path ? "page" : undefined}>
              {title}
            </a>
          ))}
        </nav>
        <span class="who">
          <span class={`role role-${session.role}`}>{session.role}</span>
          {session.via === "session" && <button onClick={leave}>Sign out</button>}
        </span>
      </header>
      <main>
        <Page route={route} session={session} />
      </main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
