// Runs a single OpenSearch node in this JVM, with the netty4 transport and the common analysis and mapper modules loaded from the classpath, for tests.
package io.lain.testsvc;

import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.logging.log4j.LogManager;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.index.mapper.MapperExtrasPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * Starts an OpenSearch node whose home directory is the only argument. The
 * settings come from config/opensearch.yml and the logging from
 * config/log4j2.properties inside that home directory.
 *
 * The stock distribution loads modules from a modules/ directory through its
 * bootstrap code; Maven Central ships the same modules as jars, so this
 * launcher passes their plugin classes to the node directly instead.
 */
public final class LainOpenSearch {

    /** Node's plugin-accepting constructor is protected, hence this subclass. */
    private static final class LainNode extends Node {
        LainNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }
    }

    private LainOpenSearch() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: LainOpenSearch <path.home>");
            System.exit(2);
        }
        Path home = Paths.get(args[0]).toAbsolutePath();
        Path config = home.resolve("config");
        Settings input = Settings.builder().put("path.home", home.toString()).build();
        Environment environment =
            InternalSettingsPreparer.prepareEnvironment(input, Collections.emptyMap(), config, () -> "n1");
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(environment.settings()));
        LogConfigurator.configure(environment);

        List<Class<? extends Plugin>> plugins =
            List.of(Netty4Plugin.class, CommonAnalysisPlugin.class, MapperExtrasPlugin.class);
        Node node = new LainNode(environment, plugins);

        // The node's own threads are daemons, so a latch keeps the JVM alive
        // until a signal runs the shutdown hook, which closes the node cleanly.
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(20, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "lain-opensearch-shutdown"));

        node.start();
        LogManager.getLogger(LainOpenSearch.class).info("node started");
        Thread keepAlive = new Thread(() -> {
            try {
                stopped.await();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }, "lain-opensearch-keepalive");
        keepAlive.setDaemon(false);
        keepAlive.start();
    }
}
